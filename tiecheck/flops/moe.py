"""Mixture-of-experts: which modules hold experts, how to trace them on meta, and active parameters.

Transformers' expert modules (classes decorated with ``use_experts_implementation``) hold every
expert's weights in 3-D tensors and pick their forward from ``config._experts_implementation``.
The default, ``grouped_mm``, sorts the (token, expert) pairs by expert and calls
``aten::_grouped_mm`` with data-dependent group offsets; its meta kernel accepts bf16 only, so a
float32 meta trace fails. For the meta trace :func:`traceable_experts` selects transformers' own
``batched_mm`` implementation, which gathers each pair's expert weights and runs one ``bmm``:
the same products (``tokens x top_k`` rows through one expert each), shapes fixed by the routing
config, nothing read from the meaningless values of meta tensors.

Top-k routing without a capacity limit gives every token exactly ``top_k`` experts, however the
router spreads the tokens, so the FLOPs are the same for every routing; see
:data:`tiecheck.flops.result.MOE_CONVENTION`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

# Attribute names of the routed experts' holder, and of the router (a Linear or a router module).
_EXPERTS_NAMES = frozenset({"experts"})
_SHARED_NAMES = frozenset({"shared_experts", "shared_expert", "shared_mlp"})
_ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate", "gating_network"})
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "num_experts_per_token", "experts_per_token",
                "num_selected_experts", "moe_top_k")
_NUM_EXPERTS_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")


def is_hf_experts(module: nn.Module) -> bool:
    """A transformers experts module whose forward is chosen by ``config._experts_implementation``."""
    cfg = getattr(module, "config", None)
    return hasattr(module, "_is_expert_parallel") and hasattr(cfg, "_experts_implementation_internal")


def experts_kind(name: str, module: nn.Module) -> str | None:
    """"routed", "shared" or "router" for a module that plays that part in an MoE block, else None."""
    attr = name.rsplit(".", 1)[-1]
    cls = type(module).__name__
    if attr in _SHARED_NAMES or "SharedExpert" in cls:
        return "shared"
    if is_hf_experts(module) or attr in _EXPERTS_NAMES or cls.endswith("Experts"):
        return "routed"
    if attr in _ROUTER_NAMES or "Router" in cls:
        return "router"
    return None


@contextmanager
def traceable_experts(root: nn.Module) -> Iterator[int]:
    """Within the block every transformers experts module runs its ``batched_mm`` forward.

    Yields the number of modules switched (0 for a dense model); their configs are restored on exit.
    """
    saved: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    try:
        for m in root.modules():
            if is_hf_experts(m) and id(m.config) not in seen:
                seen.add(id(m.config))
                saved.append((m.config, m.config._experts_implementation_internal))
                m.config._experts_implementation_internal = "batched_mm"
        yield len(saved)
    finally:
        for cfg, value in saved:
            cfg._experts_implementation_internal = value


def _int_attr(objs: list[Any], names: tuple[str, ...]) -> int | None:
    for obj in objs:
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _routing(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> tuple[int | None, int | None]:
    """(num_experts, top_k) of a routed-experts module, read from it, its block, the router and the config."""
    parent = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
    router = None
    if parent is not None:
        router = next((c for n, c in parent.named_children() if experts_kind(n, c) == "router"), None)
    objs = [o for o in (module, parent, router) if o is not None]
    objs += [getattr(o, "config", None) for o in objs if getattr(o, "config", None) is not None]
    num = len(module) if isinstance(module, nn.ModuleList) else _int_attr(objs, _NUM_EXPERTS_ATTRS)
    if num is None:
        firsts = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
        num = firsts[0] if firsts else None
    return num, _int_attr(objs, _TOP_K_ATTRS)


def parameter_counts(root: nn.Module) -> dict[str, Any]:
    """Parameters in total and active per token, and the share of each held by tied tensors.

    A tensor reachable under several names (a tie) counts once. Active per token: everything but
    the routed experts, plus ``top_k / num_experts`` of each routed-experts module (shared experts
    and dense layers are always active). ``tied`` counts the elements of tied tensors, once each.

    Args:
        root: the model, on any device (meta included).

    Returns:
        A JSON-ready dict: ``total``, ``active_per_token``, ``routed_experts``, ``moe_layers``,
        ``tied``, ``tied_share_of_total``, ``tied_share_of_active`` and, when routing could not be
        read from a routed-experts module, ``unknown_routing`` (their names; counted as all active).
    """
    names_of: dict[int, int] = {}
    numel: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        names_of[id(p)] = names_of.get(id(p), 0) + 1
        numel[id(p)] = p.numel()
    total = sum(numel.values())
    tied = sum(numel[i] for i, n in names_of.items() if n > 1)
    modules = dict(root.named_modules())
    routed = inactive = layers = 0
    unknown: list[str] = []
    counted: set[int] = set()
    for name, m in modules.items():
        if experts_kind(name, m) != "routed" or any(id(p) in counted for p in m.parameters()):
            continue
        params = {id(p): p.numel() for p in m.parameters()}
        counted.update(params)
        size = sum(params.values())
        if not size:
            continue
        num, top_k = _routing(name, m, modules)
        routed += size
        layers += 1
        if num is None or top_k is None or top_k > num:
            unknown.append(name)
            continue
        inactive += size - size * top_k // num
    active = total - inactive
    out: dict[str, Any] = {
        "total": total,
        "active_per_token": active,
        "routed_experts": routed,
        "moe_layers": layers,
        "tied": tied,
        "tied_share_of_total": tied / total if total else 0.0,
        "tied_share_of_active": tied / active if active else 0.0,
    }
    if unknown:
        out["unknown_routing"] = unknown
    return out
