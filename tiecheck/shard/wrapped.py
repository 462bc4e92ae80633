"""Ties that straddle the units of a model already wrapped with FSDP2 ``fully_shard``.

After ``fully_shard`` each unit holds its parameters as sharded DTensors, and a tie split
across two units is already two Parameters: the model no longer shows it. FSDP2 remembers it,
though: every managed parameter keeps the identity of the Parameter it replaced
(``FSDPParam._orig_param_uid``, the key of torch's own duplicate check at the first forward).
This reads that record -- no gathering, no communication -- and names the tie groups two units
manage. It reads FSDP2 internals (torch 2.13); a torch without them yields no finding.
"""

from __future__ import annotations

from typing import Any

from tiecheck.findings import Finding, finding
from tiecheck.shard.wrap import attr_path


def straddling_ties(module: Any) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(names, unit paths) of each original Parameter that more than one FSDP2 unit manages."""
    path_of = {id(m): name for name, m in module.named_modules()}
    by_uid: dict[int, dict[str, list[str]]] = {}  # uid -> unit path -> names
    seen_states: set[int] = set()
    for unit_path, m in module.named_modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            state = get_state()
            groups = list(state._fsdp_param_groups)
        except Exception:  # noqa: BLE001 - not an FSDP2 unit after all, or other internals
            continue
        if id(state) in seen_states:
            continue  # one grouped call: one state for several modules
        seen_states.add(id(state))
        for group in groups:
            for fp in getattr(group, "fsdp_params", []):
                uid, info = getattr(fp, "_orig_param_uid", None), getattr(fp, "_module_info", None)
                if uid is None or info is None:
                    continue
                owners = [(info.module, info.param_name)] + list(zip(info.shared_modules, info.shared_param_names))
                names = [f"{path_of[id(o)]}.{n}" if path_of.get(id(o)) else n for o, n in owners if id(o) in path_of]
                by_uid.setdefault(uid, {}).setdefault(unit_path or "<root>", []).extend(names)
    out = []
    for units in by_uid.values():
        if len(units) > 1:
            names = tuple(dict.fromkeys(n for ns in units.values() for n in ns))
            out.append((names, tuple(units)))
    return sorted(out)


def wrapped_findings(module: Any) -> list[Finding]:
    """TC025 for each tie group that two FSDP2 units of ``module`` manage."""
    found = []
    for names, units in straddling_ties(module):
        mods = sorted({n.rpartition(".")[0] for n in names})
        call = f"fully_shard([{', '.join(attr_path(m) for m in mods)}])"
        found.append(finding(
            "TC025", f"{' and '.join(names)} were one Parameter before fully_shard and FSDP2 units "
                     f"{' | '.join(units)} now each manage a copy: torch 2.13 refuses the model at the first "
                     "forward (earlier releases train the copies apart)", names,
            hint=f"Shard the modules that hold them in one call (`{call}`) or leave them to the root unit; "
                 "check a plan before launch with `tiecheck plan TARGET --wrap POLICY`.",
            units=list(units)))
    return found
