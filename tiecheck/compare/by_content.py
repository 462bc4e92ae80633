"""Two targets' ties matched by content, across formats whose tensor names differ by design.

A PyTorch checkpoint against its ONNX or GGUF export: every tensor of A is looked for in B by its
values -- the same bytes, the transpose, or either after a lossless dtype conversion -- and by shape
and position when no content matches; each match says how it was made. A tie of A is then one
tensor in B (kept), several tensors in B (became copies, and what they cost), or nowhere (lost);
what B stores that matches nothing of A is listed too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tiecheck.compare.tie_diff import AddedInB, Hit, OnlyInB, TensorMatch, TieDiff, TieInB
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.value_match import value_match
from tiecheck.report.report import Report


@dataclass(frozen=True)
class _Unit:
    """One memory of a side: a tie group's names together, or one tensor alone."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    logical: tuple[int, ...]  # a quantized GGUF tensor is stored as byte rows: its logical shape
    dtype: str
    nbytes: int
    tensor: Any  # the torch tensor of its first name, where the subject holds one

    def hit(self, method: str) -> Hit:
        return Hit(self.names, self.shape, self.dtype, method, self.nbytes)


def _units(report: Report, subject: Subject) -> list[_Unit]:
    """One entry per memory: a tie group's names together, every other tensor alone, in order."""
    grouped = {n: i for i, g in enumerate(report.tie_groups) for n in g.names}
    shapes = (report.extra.get("gguf") or {}).get("tensor_types", {})
    units: list[_Unit] = []
    seen: set[int] = set()
    for t in report.tensors:
        gi = grouped.get(t.name)
        if gi is not None:
            if gi in seen:
                continue
            seen.add(gi)
            names = report.tie_groups[gi].names
        else:
            names = (t.name,)
        if not t.numel:
            continue
        logical = tuple(shapes.get(t.name, {}).get("shape", t.shape))
        units.append(_Unit(names, t.shape, logical, t.dtype, t.bytes, subject.tensors.get(t.name)))
    return units


def compare_content(ra: Report, rb: Report, sa: Subject, sb: Subject) -> TieDiff:
    """The ties of A against B when names differ: every memory of A found in B by its values."""
    ua, ub = _units(ra, sa), _units(rb, sb)
    found = _by_values(ua, ub)
    _by_position(ua, ub, found)
    matches, kept, lost = [], [], []
    kinds = {g.names: g.kind for g in ra.tie_groups}
    for i, u in enumerate(ua):
        hits = tuple(ub[j].hit(m) for j, m in found.get(i, []))
        matches.append(TensorMatch(u.names, u.shape, u.dtype, hits))
        if len(u.names) < 2:
            continue
        tie = TieInB(u.names, u.shape, u.dtype, kinds[u.names], hits)
        (kept if tie.kept else lost).append(tie)
    matched_b = {j for hits in found.values() for j, _ in hits}
    b_only = [OnlyInB(v.names, v.shape, v.dtype, v.nbytes) for j, v in enumerate(ub) if j not in matched_b]
    tied_a = {tuple(sorted(g.names)) for g in ra.tie_groups}
    a_of_b: dict[int, set[int]] = {}
    for i, hits in found.items():
        for j, _ in hits:
            a_of_b.setdefault(j, set()).add(i)
    added = [AddedInB(g.names, g.kind, g.shape, g.dtype)
             for j, v in enumerate(ub) for g in rb.tie_groups if g.names == v.names
             if not any(tuple(sorted(ua[i].names)) in tied_a for i in a_of_b.get(j, ()))]
    return TieDiff(a=ra.source, b=rb.source, kept=tuple(kept), lost=tuple(lost), added=tuple(added),
                   groups_a=len(ra.tie_groups), groups_b=len(rb.tie_groups), matching="content",
                   matches=tuple(matches), b_only=tuple(b_only))


def _by_values(ua: list[_Unit], ub: list[_Unit]) -> dict[int, list[tuple[int, str]]]:
    """(B memory, how) for each memory of A whose values B holds."""
    by_numel: dict[int, list[int]] = {}
    for j, u in enumerate(ub):
        if u.tensor is not None:
            by_numel.setdefault(u.tensor.numel(), []).append(j)
    found: dict[int, list[tuple[int, str]]] = {}
    for i, u in enumerate(ua):
        if u.tensor is None:
            continue
        for j in by_numel.get(u.tensor.numel(), []):
            method = value_match(u.tensor, ub[j].tensor)
            if method:
                found.setdefault(i, []).append((j, method))
    for i, hits in found.items():
        # An untied tensor equal to several of B's (constant LayerNorm weights, say): the one
        # under the same name is its match; the others are someone else's.
        same = [(j, m) for j, m in hits if set(ub[j].names) & set(ua[i].names)]
        if len(ua[i].names) == 1 and len(hits) > 1 and same:
            found[i] = same
    return found


def _by_position(ua: list[_Unit], ub: list[_Unit], found: dict[int, list[tuple[int, str]]]) -> None:
    """Add to ``found`` the memories of A no value matched: unused B memories of the same shape, in order."""
    used_b = {j for hits in found.values() for j, _ in hits}
    for i, u in enumerate(ua):
        if i in found:
            continue
        hits = []
        for j, v in enumerate(ub):
            if j not in used_b and v.logical in (u.shape, u.shape[::-1]):
                hits.append((j, "shape and position" if v.logical == u.shape else "transposed shape and position"))
                used_b.add(j)
                # One B memory holding as many names as A's tie is the tie kept; a B memory with
                # fewer names leaves A's other names to further memories of that shape (copies).
                if sum(len(ub[k].names) for k, _ in hits) >= len(u.names):
                    break
        if hits:
            found[i] = hits
