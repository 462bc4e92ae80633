"""Ties that straddle the units of a model already wrapped with FSDP2 ``fully_shard``.

After ``fully_shard`` each unit holds its parameters as sharded DTensors, and a tie split
across two units is already two Parameters: the model no longer shows it by identity. What
decides the finding is read from the wrapped model itself, the same way on every torch release
with FSDP2 -- no gathering, no communication, and no private record of torch's (the original
Parameter's id that torch 2.13 keeps for its own duplicate check does not exist in 2.11):

- the units: an FSDP2 unit is a module ``fully_shard`` was called on (it carries
  ``_get_fsdp_state``; a grouped call's modules share one state), and a parameter belongs to
  the unit of its module's nearest such ancestor -- the rule ``fully_shard`` assigns by;
- the evidence that two names of different units were one Parameter: the same Parameter
  object under both names (a module shared by two units); a tie the model itself declares
  (transformers' ``tie_word_embeddings`` / ``_tied_weights_keys``); or every element of this
  rank's shards equal in both, for tensors of one shape that are not constant (FSDP2 shards a
  tensor the same way in every unit, so one original gives identical shards on every rank).

The last is what a plain ``nn.Module`` leaves; it holds until training moves the copies apart,
which torch 2.13 never lets happen (it refuses the model at the first forward) and torch 2.11
does silently -- check a wrapped model before its first step, or the plan before wrapping
(``tiecheck plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tiecheck.facts import attr_path
from tiecheck.findings import Finding, finding
from tiecheck.loaders.declared import live_model_declarations

FINGERPRINT = 16  # leading elements compared before a full comparison of two shards


def torch_refuses_shared_params() -> bool:
    """Whether the running torch refuses, at the root's first forward, a Parameter two FSDP2 units manage.

    Asked of torch itself (the check's presence on ``FSDPState``), not of its version number:
    torch 2.13 has it, 2.11 does not, and a release between is whatever it is.

    Returns:
        True when ``fully_shard`` raises the duplicate-parameter ValueError; False when it
        trains the copies apart, or when this torch has no FSDP2 at all.
    """
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState  # noqa: PLC0415 - torch.distributed costs a second; only the verdict needs it
    except ImportError:
        return False
    return hasattr(FSDPState, "_validate_no_duplicate_params")


@dataclass(frozen=True)
class Straddle:
    """Names that were one Parameter, the FSDP2 units that now hold them, and how that is known."""

    names: tuple[str, ...]
    units: tuple[str, ...]
    evidence: str  # "shared" | "declared" | "values"


def _units(module: Any) -> tuple[dict[str, object], dict[object, str]]:
    """(module path -> unit key) for every module ``fully_shard`` was called on, and each unit's label."""
    key_of: dict[str, object] = {}
    paths: dict[object, list[str]] = {}
    for path, m in module.named_modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            key: object = id(get_state())  # one grouped call: one state for several modules
        except Exception:  # noqa: BLE001 - an FSDPModule whose state is gone: a unit of its own
            key = ("module", id(m))
        key_of[path] = key
        paths.setdefault(key, []).append(path or "<root>")
    return key_of, {k: ", ".join(v) for k, v in paths.items()}


def _unit_of(name: str, key_of: dict[str, object]) -> object | None:
    """The unit of the module registering ``name``: its nearest ancestor (or itself) given to fully_shard."""
    path = name.rpartition(".")[0]
    while True:
        if path in key_of:
            return key_of[path]
        if not path:
            return None
        path = path.rpartition(".")[0]


def _local(t: Any) -> Any:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _comparable(t: Any) -> bool:
    """A shard with values to compare: not on the meta device, not empty, not constant (ones, zeros)."""
    if t.is_meta or t.numel() < 2:
        return False
    flat = t.detach().reshape(-1)
    return bool((flat != flat[0]).any())


def _equal_shards(params: dict[str, Any], unit: dict[str, object]) -> list[tuple[str, ...]]:
    """Groups of names in more than one unit whose tensors have one shape and identical, non-constant shards."""
    buckets: dict[tuple, list[str]] = {}
    for name, p in params.items():
        if unit.get(name) is None:
            continue
        local = _local(p.detach())
        if not _comparable(local):
            continue
        head = tuple(local.reshape(-1)[:FINGERPRINT].tolist())
        buckets.setdefault((tuple(p.shape), str(p.dtype), tuple(local.shape), head), []).append(name)
    groups = []
    for names in buckets.values():
        if len({unit[n] for n in names}) < 2:
            continue
        first = _local(params[names[0]].detach())
        same = [n for n in names if _local(params[n].detach()).equal(first)]
        if len({unit[n] for n in same}) > 1:
            groups.append(tuple(same))
    return groups


def _declared_pairs(module: Any) -> list[tuple[str, str]]:
    try:
        _, pairs, _ = live_model_declarations(module)
    except Exception:  # noqa: BLE001 - a foreign model's config: no declaration read
        return []
    return [tuple(p["names"]) for p in pairs if p.get("declared") and not p.get("conflict")]


def straddling_ties(module: Any) -> list[Straddle]:
    """Each group of names that was one Parameter before ``fully_shard`` and now lives in several units.

    Args:
        module: any ``nn.Module``; one without FSDP2 units yields nothing at once.

    Returns:
        One Straddle per group, sorted by names.
    """
    key_of, label = _units(module)
    if not key_of:
        return []
    by_id: dict[int, list[str]] = {}
    params: dict[str, Any] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
        params[name] = p
    unit = {n: _unit_of(n, key_of) for n in params}
    found: dict[frozenset, Straddle] = {}

    def add(names: tuple[str, ...], evidence: str) -> None:
        units = [unit[n] for n in names if unit.get(n) is not None]
        if len(set(units)) > 1 and frozenset(names) not in found:
            found[frozenset(names)] = Straddle(tuple(sorted(names)), tuple(dict.fromkeys(label[u] for u in units)),
                                               evidence)

    for names in by_id.values():
        add(tuple(names), "shared")
    for a, b in _declared_pairs(module):
        if a in params and b in params and params[a] is not params[b]:
            add((a, b), "declared")
    one_name = {names[0]: params[names[0]] for names in by_id.values()}  # each Parameter once
    for names in _equal_shards(one_name, unit):
        add(names, "values")
    return sorted(found.values(), key=lambda s: s.names)


_HOW = {
    "shared": "are one Parameter that FSDP2 units {units} each manage",
    "declared": "are declared tied by the model but FSDP2 units {units} each hold their own shards",
    "values": "hold identical values in FSDP2 units {units} (every element of this rank's shards): a tie that "
              "fully_shard split, each unit keeping its own copy",
}


def consequence() -> str:
    """What the running torch does with a tie split across units."""
    if torch_refuses_shared_params():
        return f"torch {torch.__version__} refuses the model at the first forward"
    return (f"torch {torch.__version__} trains the copies apart without an error (releases with FSDP2's "
            "duplicate-parameter check, 2.13 among them, refuse the model at the first forward)")


def wrapped_findings(module: Any) -> list[Finding]:
    """TC025 for each tie group that two FSDP2 units of ``module`` manage."""
    straddles = straddling_ties(module)
    if not straddles:
        return []
    then = consequence()
    found = []
    for s in straddles:
        mods = sorted({n.rpartition(".")[0] for n in s.names})
        call = f"fully_shard([{', '.join(attr_path(m) for m in mods)}])"
        found.append(finding(
            "TC025", f"{' and '.join(s.names)} {_HOW[s.evidence].format(units=' | '.join(s.units))}: {then}",
            s.names,
            hint=f"Shard the modules that hold them in one call (`{call}`) or leave them to the root unit; "
                 "check a plan before launch with `tiecheck plan TARGET --wrap POLICY`.",
            units=list(s.units), evidence=s.evidence))
    return found
