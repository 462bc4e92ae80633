"""Active parameters of a mixture of experts read from modules that are not transformers' own: a
router found beside the experts by name or class, the expert count read from a fused 3-D weight,
shared experts always active, and a routed module whose routing cannot be read named as such.

Each module is a few lines of ``nn.Module``, so the expected counts are plain arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tiecheck.flops.moe import experts_kind, parameter_counts


class FusedExperts(nn.Module):
    """Every expert's weight in one 3-D tensor, as fused kernels keep them; no count attribute."""

    def __init__(self, experts: int = 8) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(experts, 4, 6))


class TopKRouter(nn.Module):
    def __init__(self, top_k: int | None = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8, 4))
        if top_k is not None:
            self.top_k = top_k


class Block(nn.Module):
    def __init__(self, router: nn.Module, router_name: str = "router", shared: bool = False) -> None:
        super().__init__()
        self.add_module(router_name, router)
        self.experts = FusedExperts()
        if shared:
            self.shared_expert = nn.Linear(4, 4, bias=False)


def test_the_expert_count_comes_from_the_fused_weight_and_top_k_from_the_router():
    counts = parameter_counts(Block(TopKRouter(top_k=2)))
    # 192 routed parameters (8 experts x 4 x 6), 2 of 8 active: 144 inactive; the router's 32 always active.
    assert counts["total"] == 224
    assert counts["routed_experts"] == 192
    assert counts["moe_layers"] == 1
    assert counts["active_per_token"] == 224 - 144
    assert "unknown_routing" not in counts


@pytest.mark.parametrize(("name", "router"), [("gate", TopKRouter()), ("anything", TopKRouter()),
                                               ("gating_network", TopKRouter())])
def test_the_router_is_found_by_its_name_or_its_class(name, router):
    """``gate`` by name, ``TopKRouter`` by class whatever its attribute, ``gating_network`` by name."""
    assert parameter_counts(Block(router, router_name=name))["active_per_token"] == 80


def test_routing_that_cannot_be_read_is_named_and_counted_as_active():
    counts = parameter_counts(Block(TopKRouter(top_k=None)))
    assert counts["unknown_routing"] == ["experts"]
    assert counts["active_per_token"] == counts["total"] == 224


def test_shared_experts_are_always_active():
    counts = parameter_counts(Block(TopKRouter(top_k=2), shared=True))
    assert counts["total"] == 240
    assert counts["active_per_token"] == 240 - 144


@pytest.mark.parametrize(("name", "cls", "kind"), [
    ("shared_expert", "Linear", "shared"), ("mlp", "QwenSharedExpertMLP", "shared"),
    ("experts", "ModuleList", "routed"), ("blocks", "FusedExperts", "routed"),
    ("gate", "Linear", "router"), ("route", "SparseRouter", "router"),
    ("mlp", "Linear", None),
])
def test_the_part_a_module_plays(name, cls, kind):
    module = type(cls, (nn.Module,), {})()
    assert experts_kind(f"model.layers.0.{name}", module) == kind


def test_top_k_of_one_is_read():
    assert parameter_counts(Block(TopKRouter(top_k=1)))["active_per_token"] == 224 - (192 - 192 // 8)


def test_routing_is_read_from_the_blocks_config_too():
    block = Block(TopKRouter(top_k=None))
    block.config = type("Config", (), {"num_experts_per_tok": 2})()
    counts = parameter_counts(block)
    assert "unknown_routing" not in counts
    assert counts["active_per_token"] == 80


def test_blocks_nested_in_a_model_find_their_own_router():
    model = nn.ModuleDict({"layers": nn.ModuleList([Block(TopKRouter(top_k=2)), Block(TopKRouter(top_k=4))])})
    counts = parameter_counts(model)
    assert counts["moe_layers"] == 2
    assert "unknown_routing" not in counts
    assert counts["active_per_token"] == 448 - 144 - 96  # 2 of 8 and 4 of 8 experts active


def test_experts_inside_experts_count_once_and_an_empty_holder_not_at_all():
    block = Block(TopKRouter(top_k=2))
    outer = type("OuterExperts", (nn.Module,), {})()
    outer.impl = block.experts  # a routed module holding another (class names ending in Experts)
    block.experts = outer
    block.spare = type("SpareExperts", (nn.Module,), {})()  # routed by its class, no parameters
    counts = parameter_counts(block)
    assert counts["routed_experts"] == 192
    assert counts["moe_layers"] == 1
    assert counts["unknown_routing"] == ["experts"]  # the outer holder has no weight of its own to count


def test_a_childs_3d_weight_is_not_taken_for_the_expert_count():
    """Only the holder's own 3-D weights give the count: a child's could be anything (unknown, counted active)."""
    block = Block(TopKRouter(top_k=2))
    holder = type("HolderExperts", (nn.Module,), {})()
    holder.inner = nn.Module()
    holder.inner.w = nn.Parameter(torch.zeros(8, 4, 6))
    block.experts = holder
    assert parameter_counts(block)["unknown_routing"] == ["experts"]
