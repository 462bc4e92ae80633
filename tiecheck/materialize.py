"""Ties lost in materialisation: a model built on meta, made real the way training code does it.

Three ways of making a meta model real each replace Parameters module by module, and a
Parameter two modules share comes out as two (torch 2.13, measured):

- ``model.to_empty(device=...)`` then an init: every module gets its own empty Parameter
  (torchtitan#2252, accelerate#3668);
- ``model.load_state_dict(state, assign=True)``: every name gets its own Parameter, wrapping
  the same tensor -- memory still shared, but an optimizer sees two Parameters and trains them
  apart after the first step;
- a device move whose tensors cannot be swapped in place (``.to("meta")`` here; XLA devices in
  the wild): a new Parameter per module.

:func:`check_materialization` runs each way and names the tie groups that no longer are one
Parameter, with the line that re-ties them; ``tiecheck.testing.assert_ties_survive`` raises on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tiecheck.errors import TiecheckError
from tiecheck.facts import attr_path

MODES = ("to_empty", "assign", "move")


@dataclass
class Lost:
    """A tie group that came out of one materialisation as more than one Parameter."""

    mode: str
    names: tuple[str, ...]
    memory_shared: bool  # the names still share storage (distinct Parameters over one tensor)
    retie: list[str] = field(default_factory=list)  # Python lines that re-tie them


def tie_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Names that hold one Parameter object, in ``named_parameters`` order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [tuple(v) for v in by_id.values() if len(v) > 1]


def default_init(model: nn.Module) -> None:
    """Every module's own ``reset_parameters``, as ``torch.nn`` initialises a freshly built model."""
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def _build_on(build: Callable[[], nn.Module], device: Any) -> nn.Module:
    with torch.device(device):
        model = build()
    if not isinstance(model, nn.Module):
        raise TiecheckError(f"build() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _lost(model: nn.Module, groups: Iterable[tuple[str, ...]], mode: str) -> list[Lost]:
    out = []
    for names in groups:
        params = [model.get_parameter(n) for n in names]
        if all(p is params[0] for p in params[1:]):
            continue
        ptrs = {p.untyped_storage().data_ptr() for p in params}
        shared = len(ptrs) == 1 and params[0].device.type != "meta"
        out.append(Lost(mode=mode, names=names, memory_shared=shared,
                        retie=[f"{attr_path(n)} = {attr_path(names[0])}" for n in names[1:]]))
    return out


def check_materialization(build: Callable[[], nn.Module], *, materialize: Iterable[str] = MODES,
                          device: Any = "cpu", init: Callable[[nn.Module], None] | None = None,
                          after: Callable[[nn.Module], None] | None = None,
                          state_dict: Mapping[str, torch.Tensor] | None = None,
                          move_to: Any = None) -> tuple[list[tuple[str, ...]], list[Lost]]:
    """Build on meta, materialise each way, and list the ties that did not survive.

    Args:
        build: makes the model with no arguments; called under ``torch.device("meta")``
            (and under ``device`` for the ``assign`` state and the ``move`` source).
        materialize: which ways to run, among ``to_empty``, ``assign`` and ``move``.
        device: where the model is made real.
        init: initialises the model after ``to_empty`` (default: each module's ``reset_parameters``).
        after: the user's own step after materialising (e.g. ``lambda m: m.tie_weights()``),
            run before the check: the assertion then tests the user's pipeline, fix included.
        state_dict: what ``assign`` loads (default: the state dict of a model built on ``device``).
        move_to: where ``move`` sends a model built on ``device`` (default: ``"meta"``, a move
            that cannot swap tensors in place, as on XLA).

    Returns:
        (the meta model's tie groups, the ties lost, one entry per way and group).
    """
    modes = tuple(materialize)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise TiecheckError(f"materialize={modes!r}: choose among {', '.join(MODES)}")
    reference = _build_on(build, "meta")
    groups = tie_groups(reference)
    lost: list[Lost] = []
    for mode in modes:
        if mode == "to_empty":
            model = _build_on(build, "meta")
            model.to_empty(device=device)
            with torch.no_grad():
                (init or default_init)(model)
        elif mode == "assign":
            model = _build_on(build, "meta")
            state = state_dict if state_dict is not None else _build_on(build, device).state_dict()
            model.load_state_dict(state, assign=True, strict=False)
        else:
            model = _build_on(build, device)
            model.to(move_to if move_to is not None else "meta")
        if after is not None:
            after(model)
        lost += _lost(model, groups, mode)
    return groups, lost


def describe(lost: list[Lost], groups: list[tuple[str, ...]]) -> str:
    """The failure message: per way, the names whose tie was lost and the lines that re-tie them."""
    lines = [f"{len(lost)} tie(s) lost in materialisation (of {len(groups)} tie group(s) on meta):"]
    for item in lost:
        how = ("distinct Parameters over one tensor: an optimizer trains them apart" if item.memory_shared
               else "separate Parameters and memory")
        lines.append(f"  {item.mode}: {' = '.join(item.names)} -> {how}")
        lines += [f"    re-tie after materialising: {line}" for line in item.retie]
    lines.append("  hint: re-tie in the model (a tie_weights() called after materialising, as Hugging Face "
                 "models do), then pass it as after=lambda m: m.tie_weights() to test the fixed pipeline")
    return "\n".join(lines)
