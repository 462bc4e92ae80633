"""Identical layers traced once: the plan that lets a 61-layer model be counted from a few layers.

A Transformer's layers are usually copies of a few kinds (DeepSeek-V3: 3 dense, then 58 MoE;
Gemma: sliding and full attention alternating). :func:`plan_layers` gives each layer a
signature -- its module classes, parameter and buffer shapes, the plain attributes of every
submodule (not its index), and the entries of per-layer config lists (``layer_types``, ...) at
its index -- and keeps the shortest prefix of the layer list that holds every signature. The
prefix is traced at its true indices, so index-driven config lists still line up; every layer
beyond it is counted as the FLOPs traced for the first layer of the same signature.

A signature says what a layer holds, not what it is given: Funnel's encoder pools the sequence
before the first layer of a block, whose keys then run at the longer length while the block's later
layers, identical modules, run at the pooled one. So the prefix ends with one repeat more, and the
count is taken from the plan only when that repeat counted what its representative did
(:func:`fold_holds`); otherwise every layer is traced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# Attributes that hold a layer's own index: they differ between otherwise identical layers.
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_number", "layer_index", "idx", "block_idx",
                          "layer_num"})
_PLAIN = (int, float, str, bool, type(None))


@dataclass
class LayerPlan:
    """The layer list ``name`` of ``n`` layers, traced as its first ``keep`` (``rep[i]``: the layer counted for i)."""

    name: str
    n: int
    keep: int
    rep: list[int] = field(default_factory=list)

    @property
    def saves(self) -> bool:
        return self.keep < self.n


def _plain(v: Any) -> bool:
    if isinstance(v, _PLAIN):
        return True
    return isinstance(v, (tuple, list)) and len(v) <= 64 and all(isinstance(x, _PLAIN) for x in v)


def _signature(layer: nn.Module, per_index: list[Any]) -> tuple:
    items: list[Any] = []
    for name, m in layer.named_modules():
        items.append((name, type(m).__qualname__))
        for k, v in sorted(vars(m).items()):
            if not k.startswith("_") and k not in _INDEX_ATTRS and _plain(v):
                items.append((name, k, tuple(v) if isinstance(v, list) else v))
    for name, t in list(layer.named_parameters(remove_duplicate=False)) + list(
            layer.named_buffers(remove_duplicate=False)):
        items.append((name, tuple(t.shape), str(t.dtype)))
    items.append(tuple(per_index))
    return tuple(items)


def _per_index_lists(root: nn.Module, n: int) -> list[list[Any]]:
    """Config lists with one entry per layer (``layer_types``, ``mlp_only_layers`` as a mask, ...)."""
    out: list[list[Any]] = []
    configs = [getattr(root, "config", None)]
    configs += [getattr(configs[0], k, None) for k in ("text_config", "decoder")] if configs[0] is not None else []
    for cfg in configs:
        if cfg is None:
            continue
        for v in vars(cfg).values():
            if isinstance(v, (list, tuple)) and len(v) == n:
                out.append(list(v))
    return out


def plan_layers(root: nn.Module, layer_names: set[str]) -> LayerPlan | None:
    """The plan for the longest layer list among ``layer_names`` (items of ModuleLists), or None.

    Args:
        root: the model.
        layer_names: dotted names of the Transformer layers (items of a ModuleList).

    Returns:
        A :class:`LayerPlan` when tracing a prefix saves at least one layer, else None.
    """
    lists: dict[str, int] = {}
    for name in layer_names:
        parent, _, idx = name.rpartition(".")
        if idx.isdigit():
            lists[parent] = lists.get(parent, 0) + 1
    if not lists:
        return None
    name = max(sorted(lists), key=lambda k: lists[k])  # sorted: equal lengths never left to a set's order
    if not name:
        return None
    mlist = root.get_submodule(name) if name else root
    if not isinstance(mlist, nn.ModuleList) or len(mlist) < 3:
        return None
    n = len(mlist)
    per_index = _per_index_lists(root, n)
    first: dict[tuple, int] = {}
    rep: list[int] = []
    for i, layer in enumerate(mlist):
        sig = _signature(layer, [lst[i] for lst in per_index])
        rep.append(first.setdefault(sig, i))
    keep = max(first.values()) + 2  # every signature, and the first repeat to check the fold against
    plan = LayerPlan(name, n, keep, rep)
    return plan if plan.saves else None


def fold_holds(plan: LayerPlan, per_layer: dict[int, Any], per_layer_calls: dict[int, Any]) -> bool:
    """Whether the last traced layer, a repeat, counted what its representative counted.

    Args:
        plan: the plan the trace ran with.
        per_layer: FLOPs by operator of each traced layer of the planned list, by index.
        per_layer_calls: attention calls of each, by index.

    Returns:
        True when the later layers may be counted as their representatives.
    """
    check = plan.keep - 1
    rep = plan.rep[check]
    return per_layer.get(check) == per_layer.get(rep) and per_layer_calls.get(check) == per_layer_calls.get(rep)


@contextmanager
def traced_prefix(root: nn.Module, plan: LayerPlan | None) -> Iterator[None]:
    """Within the block the planned layer list holds only its first ``plan.keep`` layers."""
    if plan is None:
        yield
        return
    parent_name, _, attr = plan.name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[: plan.keep]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def layer_of(owner: str, plan: LayerPlan | None) -> int | None:
    """Index of the planned list's layer that module ``owner`` lies in, else None."""
    if plan is None or not owner.startswith(plan.name + "."):
        return None
    head = owner[len(plan.name) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None
