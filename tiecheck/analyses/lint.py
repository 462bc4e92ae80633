"""Lint rules over facts that no other analysis covers: Linear shapes and devices (expectations: tiecheck/expect.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from tiecheck.analyses.ties import TieGroup
from tiecheck.facts import ModuleFact, TensorFact
from tiecheck.findings import Finding, finding


def _tied_to(groups: list[TieGroup]) -> dict[str, tuple[str, ...]]:
    return {n: tuple(m for m in g.names if m != n) for g in groups for n in g.names}


def linear_shape_findings(facts: Sequence[TensorFact], modules: dict[str, ModuleFact],
                          groups: list[TieGroup]) -> list[Finding]:
    """TC001: an nn.Linear whose weight or bias disagrees with its declaration or each other.

    The snippet ``out = nn.Linear(vocab_size, d_model); out.weight = emb.weight`` runs and even
    computes the right matmul (F.linear reads the weight, not in/out_features), but the bias
    it made has d_model entries while the logits have vocab_size, and every tool that trusts
    ``out_features`` sizes the output wrongly.
    """
    # An owner's bias is named "<owner>.bias" ("bias" at the root). Without a module, only a bias can
    # disagree with its weight: the owners of a file's 100,000 expert weights without one are not looked at,
    # and a file without a bias builds no index of its names at all (a million names: half a second).
    biased = {n[:-5] if n != "bias" else "" for n in (f.name for f in facts) if n == "bias" or n.endswith(".bias")}
    if not biased and not modules:
        return []
    by_name = {f.name: f for f in facts}
    tied = _tied_to(groups)
    out = []
    owners = sorted({f.owner for f in facts if (f.owner in biased or f.owner in modules) and f.attr == "weight"})
    for owner in owners:
        w = by_name.get(f"{owner}.weight" if owner else "weight")
        if w is None or len(w.shape) != 2:
            continue
        m = modules.get(owner)
        if modules and (m is None or "Linear" not in m.type):
            continue
        b = by_name.get(f"{owner}.bias" if owner else "bias")
        problems = []
        if m is not None and m.get("out_features") is not None and m.get("in_features") is not None:
            declared = (m.get("out_features"), m.get("in_features"))
            if tuple(w.shape) != declared:
                problems.append(f"it is declared nn.Linear(in_features={declared[1]}, out_features={declared[0]}) "
                                f"but its weight is {list(w.shape)}")
        # Without module types (a file), a bias that matches the weight's columns is the (in, out)
        # layout of GPT-2's Conv1D, not a broken Linear, unless the weight is tied to an embedding.
        conv1d_layout = (not modules and b is not None and len(b.shape) == 1 and b.shape[0] == w.shape[1]
                         and w.name not in tied)
        if b is not None and len(b.shape) == 1 and b.shape[0] != w.shape[0] and not conv1d_layout:
            problems.append(f"its bias has {b.shape[0]} entries but the output has {w.shape[0]}, so the bias "
                            f"cannot broadcast")
        elif b is not None and len(b.shape) != 1:
            problems.append(f"its bias has shape {list(b.shape)}")
        if not problems:
            continue
        names = [w.name] + ([b.name] if b is not None else [])
        tie = f" (weight tied with {', '.join(tied[w.name])})" if w.name in tied else ""
        label = owner or "the root module"
        out.append(finding("TC001", f"{label}{tie}: " + "; ".join(problems), names))
    return out


def device_findings(facts: Sequence[TensorFact], groups: list[TieGroup]) -> list[Finding]:
    """TC004: a tie whose users keep their other tensors on another device."""
    if not groups:
        return []
    tied = {n for g in groups for n in g.names}
    by_name = {f.name: f for f in facts if f.name in tied}
    # Only the owners of tied names: a checkpoint of 100,000 tensors has tens of thousands of owners.
    wanted = {f.owner for f in by_name.values()}
    devices_of_owner: dict[str, set[str]] = defaultdict(set)
    for f in facts:
        if f.owner in wanted:
            devices_of_owner[f.owner].add(f.device)
    out = []
    for g in groups:
        owners = {by_name[n].owner for n in g.names if n in by_name}
        devices = set(g.devices)
        for o in owners:
            devices |= devices_of_owner.get(o, set())
        if len(devices) > 1:
            out.append(finding("TC004", f"the tie {', '.join(g.names)} spans devices {', '.join(sorted(devices))}",
                               g.names))
    return out
