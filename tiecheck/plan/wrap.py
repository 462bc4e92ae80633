"""FSDP2 wrap plans replayed without a process group: will ``fully_shard`` accept them, and what fixes them.

The rule replayed is torch's own (``torch/distributed/fsdp/_fully_shard``, read in torch 2.11 and 2.13):

- ``fully_shard(modules)`` manages every module reached by a depth-first walk from ``modules``
  that stops at a module some earlier ``fully_shard`` call was given (a nested unit), and every
  parameter those modules register directly, each Parameter object once per call
  (``_get_managed_modules``, ``_get_managed_states``).
- At the root's first forward, torch 2.13's ``FSDPState._validate_no_duplicate_params`` walks
  the units in the order of the root's ``named_modules()`` and raises ``ValueError: Parameter
  '<fqn>' is shared with a parameter already managed by another FSDP group`` when one
  Parameter object is managed by two units. torch 2.11 has no such check (its ``FSDPState``
  goes from ``_init_shared_state`` straight to the groups' lazy init): the same plan trains,
  each unit updating its own shards of the tied weight. The verdict is the running torch's
  (:func:`torch_refuses_shared_params` asks it).

So a tie survives sharding only when every name of its group is registered by modules of one
unit. The fix puts the modules that hold a straddling tie into one call
(``fully_shard([model.embed, model.head])``), or leaves them all to the root unit.

Nothing here allocates or communicates: the model may live on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tiecheck.errors import TiecheckError
from tiecheck.facts import attr_path
from tiecheck.loaders.fsdp import torch_refuses_shared_params

POLICIES = ("blocks", "none")
ROOT = ""


@dataclass(frozen=True)
class Unit:
    """The modules given to one ``fully_shard`` call, by path (``""`` is the root)."""

    paths: tuple[str, ...]

    @property
    def is_root(self) -> bool:
        return ROOT in self.paths

    def call(self, var: str = "model") -> str:
        """The Python line that applies this unit, e.g. ``fully_shard([model.a, model.b])``."""
        exprs = [attr_path(p, var) for p in self.paths]
        return f"fully_shard({exprs[0]})" if len(exprs) == 1 else f"fully_shard([{', '.join(exprs)}])"

    def label(self) -> str:
        return ", ".join(p or "<root>" for p in self.paths)


@dataclass
class Straddle:
    """A tie group whose Parameter more than one unit would manage."""

    names: tuple[str, ...]  # every name of the tied Parameter
    units: tuple[int, ...]  # indices (into the plan) of the units that would manage it
    names_by_unit: dict[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class WrapCheck:
    """What ``fully_shard`` would do with a plan, and the plan that keeps every tie."""

    policy: str
    units: list[Unit]
    tie_groups: list[tuple[str, ...]]
    owner: dict[str, int | None]  # parameter name -> index of the unit managing it (None: no unit)
    straddles: list[Straddle]
    # What torch's duplicate-parameter check raises for this plan at the first forward (torch 2.13
    # has the check; ``refused`` says whether the running torch does); None when nothing trips it.
    error: str | None
    fix: list[Unit] | None = None  # a plan that keeps every tie, when this one does not
    notes: list[str] = field(default_factory=list)
    refused: bool = False  # the running torch raises ``error`` at the first forward
    torch_version: str = torch.__version__

    @property
    def accepted(self) -> bool:
        """Every tie stays one Parameter (one shard set), whatever the torch release."""
        return not self.straddles

    def verdict(self) -> str:
        """What the running torch does with the plan, in one line."""
        if self.accepted:
            return "accepted: every tie stays in one unit"
        if self.error and self.refused:
            return f"refused at the first forward (torch {self.torch_version}): {self.error}"
        if self.error:
            return (f"trains the tie as separate shards without an error (torch {self.torch_version} has no check "
                    "for a Parameter shared across units; releases with it, 2.13 among them, refuse this plan at "
                    f"the first forward: {self.error})")
        return "unsafe: a tie straddles units and no root unit checks them; the shards train apart"

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "accepted": self.accepted,
            "verdict": self.verdict(),
            "torch": self.torch_version,
            "refused_at_first_forward": self.refused,
            "error": self.error,
            "units": [{"paths": list(u.paths), "call": u.call()} for u in self.units],
            "tie_groups": [
                {"names": list(g), "units": sorted({self.owner[n] for n in g if self.owner.get(n) is not None}),
                 "straddles": any(set(g) == set(s.names) for s in self.straddles)}
                for g in self.tie_groups],
            "straddles": [{"names": list(s.names), "units": list(s.units),
                           "names_by_unit": {str(k): list(v) for k, v in s.names_by_unit.items()}}
                          for s in self.straddles],
            "fix": [u.call() for u in self.fix] if self.fix is not None else None,
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------
# Policies
# ------------------------------------------------------------------------------------------

def block_paths(model: nn.Module) -> list[str]:
    """The transformer blocks: items of the outermost ``nn.ModuleList``s whose items share one class."""
    found: list[str] = []
    taken: list[str] = []
    for name, mod in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            found += [f"{name}.{i}" if name else str(i) for i in range(len(mod))]
            taken.append(name)
    return found


def plan_units(model: nn.Module, policy: str | Callable[[nn.Module], Iterable[Any]]) -> list[Unit]:
    """The units of a policy, in the order ``fully_shard`` is called.

    Args:
        model: the model to shard (any device; meta is enough).
        policy: ``"blocks"`` (every transformer block its own unit, then the root), ``"none"``
            (the root alone), or a function of the model returning the module paths to shard, in
            call order; an item that is a list or tuple of paths is one grouped call.

    Returns:
        One Unit per ``fully_shard`` call.
    """
    if policy == "blocks":
        return [Unit((p,)) for p in block_paths(model)] + [Unit((ROOT,))]
    if policy == "none":
        return [Unit((ROOT,))]
    if isinstance(policy, str):
        raise TiecheckError(f"--wrap {policy}: choose blocks, none, or a Python spec file.py:fn returning the "
                            "module paths to fully_shard")
    try:
        raw = list(policy(model))
    except TiecheckError:
        raise
    except Exception as e:  # the user's code: one line, not a traceback
        raise TiecheckError(f"the wrap policy raised {type(e).__name__}: {e}") from e
    return units_from(raw)


def units_from(raw: Sequence[Any]) -> list[Unit]:
    units = []
    for item in raw:
        paths = (item,) if isinstance(item, str) else tuple(item) if isinstance(item, (list, tuple)) else None
        if not paths or not all(isinstance(p, str) for p in paths):
            raise TiecheckError(f"wrap plan item {item!r}: give a module path (str) or a list of them for one "
                                "grouped fully_shard call")
        units.append(Unit(tuple("" if p in (".", "<root>") else p for p in paths)))
    return units


# ------------------------------------------------------------------------------------------
# The replay
# ------------------------------------------------------------------------------------------

def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise TiecheckError(f"wrap plan: the model has no module '{path}'; paths are those of "
                            "model.named_modules(), '' for the root") from None


def _postorder(mod: nn.Module, root_ids: set[int], given: set[int], visited: set[int],
               modules: list[nn.Module]) -> None:
    """Append ``mod``'s subtree to ``modules`` children first, as ``fully_shard`` walks it."""
    if id(mod) not in root_ids and id(mod) in given:
        return  # a nested unit manages its own subtree
    visited.add(id(mod))
    for child in mod.children():
        if id(child) not in visited:
            _postorder(child, root_ids, given, visited, modules)
    modules.append(mod)


def _assign(model: nn.Module, units: list[Unit]) -> list[list[nn.Parameter]]:
    """Each unit's managed parameters, as ``fully_shard`` collects them when called in order."""
    given: set[int] = set()  # modules some fully_shard call was given (they carry FSDP state)
    managed: list[list[nn.Parameter]] = []
    for unit in units:
        roots = [_module(model, p) for p in unit.paths]
        root_ids = {id(m) for m in roots}
        if any(id(m) in given for m in roots):
            dup = next(p for p, m in zip(unit.paths, roots, strict=True) if id(m) in given)
            raise TiecheckError(f"wrap plan: module '{dup or '<root>'}' is given to fully_shard twice")
        visited: set[int] = set()
        modules: list[nn.Module] = []
        for m in roots:
            _postorder(m, root_ids, given, visited, modules)
        params: list[nn.Parameter] = []
        seen: set[int] = set()
        for mod in modules:
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    params.append(p)
                    seen.add(id(p))
        managed.append(params)
        given |= root_ids
    return managed


def _tie_groups(model: nn.Module) -> tuple[list[tuple[str, ...]], dict[int, list[str]]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    groups = sorted(tuple(names) for names in by_id.values() if len(names) > 1)
    return groups, by_id


def _names_in(model: nn.Module, units: list[Unit], unit_index: int, names: list[str]) -> tuple[str, ...]:
    """The names of ``param`` registered by modules the unit manages (by module path prefix)."""
    inside = []
    for n in names:
        owner = n.rpartition(".")[0]
        if _unit_of_module(model, units, owner) == unit_index:
            inside.append(n)
    return tuple(inside)


def _unit_of_module(model: nn.Module, units: list[Unit], path: str) -> int | None:
    """The unit managing the module at ``path``: the last-called unit among its nearest ancestors."""
    best, depth = None, -1
    for i, u in enumerate(units):
        for p in u.paths:
            if p == ROOT or path == p or path.startswith(p + "."):
                d = len(p.split(".")) if p else 0
                if d > depth:
                    best, depth = i, d
    return best


def _error(model: nn.Module, units: list[Unit], managed: list[list[nn.Parameter]],
           by_id: dict[int, list[str]]) -> str | None:
    """The ValueError torch raises at the root's first forward, replayed in its order."""
    if not any(u.is_root for u in units):
        return None  # no root unit: nothing validates the units against each other
    order: list[int] = []
    for name, _ in model.named_modules():
        for i, u in enumerate(units):
            if name in u.paths and i not in order:
                order.append(i)
    seen: set[int] = set()
    for i in order:
        for p in managed[i]:
            if id(p) in seen:
                names = _names_in(model, units, i, by_id[id(p)]) or tuple(by_id[id(p)])
                return (f"ValueError: Parameter '{names[0]}' is shared with a parameter already managed by another "
                        "FSDP group")
            seen.add(id(p))
    return None


def _merge(units: list[Unit], involved: set[int]) -> list[Unit]:
    """One grouped call for the involved units, at the last one's place; the root absorbs them."""
    last = max(involved)
    paths: list[str] = []
    for i in sorted(involved):
        paths += [p for p in units[i].paths if p not in paths]
    # A path under another one of the call is already reached by the walk from it.
    paths = [ROOT] if ROOT in paths else [p for p in paths if not any(q != p and p.startswith(q + ".") for q in paths)]
    out = []
    for i, u in enumerate(units):
        if i == last:
            out.append(Unit(tuple(paths)))
        elif i not in involved:
            out.append(u)
    return out


def check_plan(model: nn.Module, policy: str | Callable[[nn.Module], Iterable[Any]] = "blocks",
               units: list[Unit] | None = None) -> WrapCheck:
    """Replay ``fully_shard`` over a plan and say whether every tie stays in one unit.

    Args:
        model: the model (any device; meta is enough; no process group needed).
        policy: a policy for :func:`plan_units`, or its label when ``units`` is given.
        units: the plan itself, overriding ``policy``.

    Returns:
        A WrapCheck: the units, each tie group's units, the straddling groups, torch's error for
        the plan (None when accepted), and a fixed plan when this one loses a tie.
    """
    label = policy if isinstance(policy, str) else getattr(policy, "__name__", "custom")
    units = list(units) if units is not None else plan_units(model, policy)
    if not units:
        raise TiecheckError("wrap plan: no module to shard; give at least the root ('')")
    groups, by_id = _tie_groups(model)
    check = _replay(model, units, groups, by_id, label)
    if check.straddles:
        fixed = units
        for _ in range(len(units)):
            again = _replay(model, fixed, groups, by_id, label)
            if not again.straddles:
                break
            fixed = _merge(fixed, set(again.straddles[0].units))
        check.fix = fixed
    if not any(u.is_root for u in units):
        check.notes.append("the root is not a unit: wrap it last (fully_shard(model)); parameters outside every "
                           "unit stay unsharded, and without a root unit torch does not check units against each "
                           "other, so a straddling tie trains as separate shards")
    unmanaged = sorted(n for n, i in check.owner.items() if i is None)
    if unmanaged:
        check.notes.append(f"{len(unmanaged)} parameter name(s) in no unit (not sharded): {', '.join(unmanaged[:4])}"
                           + (" ..." if len(unmanaged) > 4 else ""))
    return check


def _replay(model: nn.Module, units: list[Unit], groups: list[tuple[str, ...]], by_id: dict[int, list[str]],
            label: str) -> WrapCheck:
    managed = _assign(model, units)
    unit_of: dict[int, list[int]] = {}
    for i, params in enumerate(managed):
        for p in params:
            unit_of.setdefault(id(p), []).append(i)
    owner: dict[str, int | None] = {}
    for pid, names in by_id.items():
        us = unit_of.get(pid, [])
        for n in names:
            owner[n] = _unit_of_module(model, units, n.rpartition(".")[0]) if us else None
    straddles = []
    for pid, us in unit_of.items():
        if len(us) > 1:
            names = tuple(by_id[pid])
            straddles.append(Straddle(names=names, units=tuple(us),
                                      names_by_unit={i: _names_in(model, units, i, by_id[pid]) for i in us}))
    straddles.sort(key=lambda s: s.names)
    error = _error(model, units, managed, by_id)
    return WrapCheck(policy=label, units=list(units), tie_groups=groups, owner=owner, straddles=straddles,
                     error=error, refused=error is not None and torch_refuses_shared_params())


def apply_plan(model: nn.Module, units: list[Unit], fully_shard: Callable[..., Any], **kwargs: Any) -> None:
    """Call ``fully_shard`` for each unit in order (a grouped unit gets the list of its modules)."""
    for u in units:
        mods = [model.get_submodule(p) for p in u.paths]
        fully_shard(mods[0] if len(mods) == 1 else mods, **kwargs)


def render_text(check: WrapCheck, target: str) -> str:
    """The plan check as the terminal shows it."""
    lines = [f"wrap plan of {target}, --wrap {check.policy}: {len(check.units)} fully_shard call(s)"]
    lines.append(f"verdict: {check.verdict()}")
    lines.append("calls, in this order:" if check.units else "calls: none")
    lines += [f"  {u.call()}" for u in check.units]
    lines.append("ties:" if check.tie_groups else "ties: none")
    for g in check.tie_groups:
        us = sorted({check.owner[n] for n in g if check.owner.get(n) is not None})
        where = " | ".join(check.units[i].label() for i in us) or "no unit"
        mark = "STRADDLES" if len(us) > 1 else "kept"
        lines.append(f"  {mark:9} {' = '.join(g)}  (unit: {where})")
    if check.fix is not None:
        lines.append("fix: apply these calls instead, in this order:")
        lines += [f"  {u.call()}" for u in check.fix]
        lines.append("  (or drop the units that hold a tied name and leave them to the root unit)")
    lines += [f"note: {n}" for n in check.notes]
    return "\n".join(lines) + "\n"
