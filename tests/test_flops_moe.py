"""Mixture-of-experts FLOPs: exact against FlopCounterMode on tiny real models, closed form at full size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tiecheck
from tiecheck.flops import count_flops
from tiecheck.flops.moe import traceable_experts
from tiecheck.report.render import render

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    Qwen3MoeConfig,
)

T = 16
COMMON = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)


def tiny_configs() -> dict:
    return {
        "mixtral": MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        # layer 0 dense (mlp_only_layers), layer 1 sparse
        "qwen3_moe": Qwen3MoeConfig(**COMMON, head_dim=8, moe_intermediate_size=24, num_experts=4,
                                    num_experts_per_tok=2, mlp_only_layers=[0]),
        # layer 0 dense (first_k_dense_replace), layer 1: 8 routed experts top-2 + 1 shared; MLA
        "deepseek_v3": DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=16,
                                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                                        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                        v_head_dim=6),
    }


def _meta_model(cfg):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_tiny_meta_count_equals_flop_counter_mode_on_real_weights(family):
    # Eager experts (one linear per expert hit) and eager attention (two matmuls): every product
    # FlopCounterMode sees is an mm or bmm it counts exactly, 2 FLOPs per multiply-add like tiecheck.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_configs()[family], attn_implementation="eager",
                                             experts_implementation="eager").eval()
    ids = torch.randint(0, COMMON["vocab_size"], (1, T))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    expected = fc.get_total_flops()

    meta = count_flops(model, seq_len=T, device="meta")
    assert meta.available, meta.reason
    assert meta.forward == expected
    assert meta.by_part["experts"] > 0
    assert meta.by_part["router"] > 0
    assert meta.uncounted_ops == {}
    assert model.config._experts_implementation == "eager"  # restored after the trace

    # transformers' default experts on the CPU run aten::_grouped_mm: its handle counts the same
    model.set_experts_implementation("grouped_mm")
    real = count_flops(model, seq_len=T, device="cpu")
    assert real.by_operator.get("_grouped_mm", 0) > 0
    assert real.forward == expected


def test_tiny_parts_and_active_parameters_deepseek():
    cfg = tiny_configs()["deepseek_v3"]
    r = count_flops(_meta_model(cfg), seq_len=T)
    h, e, k = 32, 8, 2
    assert r.by_part["router"] == 2 * T * h * e
    # (top-2 routed + 1 shared) experts of width 16, gate/up/down
    assert r.by_part["experts"] == 2 * T * (k + 1) * 3 * h * 16
    assert r.by_part["mlp"] == 2 * T * 3 * h * 48  # the dense first layer
    p = r.parameters
    routed = e * 3 * h * 16
    assert p["routed_experts"] == routed
    assert p["moe_layers"] == 1
    assert p["active_per_token"] == p["total"] - routed + routed * k // e
    assert p["tied"] == 0
    assert "capacity factor" in r.convention
    assert "does not depend on how tokens spread" in r.convention


def test_tied_share_of_parameters():
    cfg = MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)
    r = count_flops(_meta_model(cfg), seq_len=T)
    p = r.parameters
    assert p["tied"] == COMMON["vocab_size"] * COMMON["hidden_size"]
    assert p["tied_share_of_total"] == p["tied"] / p["total"]
    assert p["tied_share_of_active"] == p["tied"] / p["active_per_token"]


def _fail_inside(context, record) -> None:
    """Enter ``context``, record what it yields, then fail inside it."""
    with context as value:
        record(value)
        raise RuntimeError("boom")


def test_traceable_experts_restores_config_on_error():
    model = _meta_model(tiny_configs()["mixtral"])
    before = model.config._experts_implementation
    inside = []
    with pytest.raises(RuntimeError, match="boom"):
        _fail_inside(traceable_experts(model), lambda n: inside.append((n, model.config._experts_implementation)))
    assert inside == [(1, "batched_mm")]
    assert model.config._experts_implementation == before


def _gqa_attention(t, h, nh, nkv, dh):
    proj = 2 * t * h * (nh * dh + 2 * nkv * dh) + 2 * t * nh * dh * h
    scores = 4 * t * t * nh * dh
    return proj + scores


S = 128


def test_mixtral_8x7b_closed_form():
    c = MixtralConfig()  # Mixtral-8x7B: 32 layers, 4096 wide, 8 experts of 14336, top-2
    h, layers, inter, e, k, v = 4096, 32, 14336, 8, 2, 32000
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (h, layers, inter)
    per_layer = _gqa_attention(S, h, 32, 8, 128) + 2 * S * h * e + 2 * S * k * 3 * h * inter
    formula = layers * per_layer + 2 * S * h * v
    r = count_flops(_meta_model(c), seq_len=S)
    assert abs(r.forward - formula) / formula < 0.01
    assert r.parameters["total"] == pytest.approx(46.70e9, rel=1e-3)
    assert r.parameters["active_per_token"] == pytest.approx(12.88e9, rel=1e-3)
    assert any("identical layers traced once" in n for n in r.notes)


def test_qwen3_moe_30b_a3b_like_closed_form():
    # Qwen3-30B-A3B's shape, with the first two layers dense to check mlp_only_layers
    c = Qwen3MoeConfig(num_hidden_layers=48, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                       num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                       head_dim=128, vocab_size=151936, mlp_only_layers=[0, 1])
    h = 2048
    attn = _gqa_attention(S, h, 32, 4, 128)
    dense = attn + 2 * S * 3 * h * 6144
    sparse = attn + 2 * S * h * 128 + 2 * S * 8 * 3 * h * 768
    formula = 2 * dense + 46 * sparse + 2 * S * h * 151936
    r = count_flops(_meta_model(c), seq_len=S)
    assert abs(r.forward - formula) / formula < 0.01
    assert r.parameters["moe_layers"] == 46


def test_deepseek_v3_default_closed_form():
    c = DeepseekV3Config()  # 61 layers, first 3 dense, 256 routed experts top-8 + 1 shared, MLA
    h, nh, ql, kvl, nope, rope, vd = 7168, 128, 1536, 512, 128, 64, 128
    mla = 2 * S * (h * ql + ql * nh * (nope + rope) + h * (kvl + rope) + kvl * nh * (nope + vd) + nh * vd * h)
    scores = 2 * S * S * nh * (nope + rope) + 2 * S * S * nh * vd
    dense = mla + scores + 2 * S * 3 * h * 18432
    moe = mla + scores + 2 * S * h * 256 + 2 * S * (8 + 1) * 3 * h * 2048
    formula = 3 * dense + 58 * moe + 2 * S * h * 129280
    r = count_flops(_meta_model(c), seq_len=S)
    assert abs(r.forward - formula) / formula < 0.01
    p = r.parameters
    routed = 58 * 256 * 3 * h * 2048
    assert p["routed_experts"] == routed
    assert p["active_per_token"] == p["total"] - routed + routed * 8 // 256
    assert p["total"] == pytest.approx(671.0e9, rel=1e-3)


def test_text_report_shows_experts_router_and_active_parameters():
    report = tiecheck.analyze(_meta_model(tiny_configs()["deepseek_v3"]), flops=True, seq_len=T)
    text = render(report, "table")
    assert "\nexperts " in text
    assert "\nrouter " in text
    assert "active per token" in text
    assert "1 MoE layers" in text
    assert report.to_dict()["flops"]["parameters"]["moe_layers"] == 1


class _BoolScatterMask(torch.nn.Module):
    """A sparse-attention-style mask: keep the top-2 keys, written with scatter(..., False)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ x.transpose(-1, -2)
        idx = scores.topk(2, dim=-1).indices
        mask = torch.ones_like(scores, dtype=torch.bool).scatter(-1, idx, False)
        return self.proj(scores.masked_fill(mask, 0.0) @ x)


def test_scatter_with_a_bool_value_traces():
    # the TorchScript tracer's alias analysis has no scatter schema for a bool scalar
    x = torch.randn(1, 4, 8)
    before = torch.Tensor.scatter
    r = count_flops(_BoolScatterMask(), inputs=x, device="meta")
    assert r.available, r.reason
    assert r.forward == 2 * (4 * 8 * 4 + 4 * 4 * 8 + 4 * 8 * 8)
    assert torch.Tensor.scatter is before
