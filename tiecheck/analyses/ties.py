"""Tie groups: names that share memory, found by identical memory extent.

Grouping by storage pointer alone would call every slice of one flat buffer (FSDP flat
parameters, fused QKV weights) a tie. Two names are tied only when they cover exactly the
same bytes of the same storage. Names that overlap without covering the same bytes are
reported as nested views or partial overlaps. On the meta device there is no memory, so
identity of the Parameter (or buffer) object decides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tiecheck.facts import TensorFact
from tiecheck.findings import Finding, finding

# Group kinds, from the safest to the most suspicious.
SAME_PARAMETER = "same_parameter"  # one Parameter object under several names: one gradient
SHARED_STORAGE = "shared_storage"  # same memory, seen in a file (no Parameter objects to compare)
DISTINCT_PARAMETERS = "distinct_parameters"  # several Parameter objects over one memory: a bug
TRANSPOSED_ALIAS = "transposed_alias"  # same bytes seen as the transpose
RESTRIDED_ALIAS = "restrided_alias"  # same bytes, other shape or strides

KINDS = (SAME_PARAMETER, SHARED_STORAGE, DISTINCT_PARAMETERS, TRANSPOSED_ALIAS, RESTRIDED_ALIAS)


@dataclass(frozen=True)
class TieGroup:
    """Names over one memory: a report's ``tie_groups`` entry.

    ``devices`` and ``objects`` are what the analysis saw and the findings use; a report's JSON does
    not hold them (nor ``layouts``, except for the transposed and restrided kinds), so a group read
    back from JSON has them empty and compares equal to the one written.
    """

    names: tuple[str, ...]  # sorted
    kind: str
    shape: tuple[int, ...]  # of the first name
    dtype: str
    numel: int
    itemsize: int
    devices: tuple[str, ...] = field(default=(), compare=False)
    # (name, shape, stride) of every name
    layouts: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = field(default=(), compare=False)
    # Distinct Parameter/buffer objects among the names (0 when read from a file).
    objects: int = field(default=0, compare=False)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def bytes_saved(self) -> int:
        """Bytes a per-name sum counts beyond the one copy that exists."""
        return (len(self.names) - 1) * self.nbytes

    def to_dict(self) -> dict:
        d = {
            "names": list(self.names),
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            "bytes_saved": self.bytes_saved,
        }
        if self.kind in (TRANSPOSED_ALIAS, RESTRIDED_ALIAS):
            d["layouts"] = [{"name": n, "shape": list(s), "stride": list(st)} for n, s, st in self.layouts]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TieGroup:
        names, numel = tuple(d["names"]), int(d["numel"])
        copies = (len(names) - 1) * numel
        return cls(names=names, kind=d["kind"], shape=tuple(d["shape"]), dtype=d["dtype"], numel=numel,
                   itemsize=d["bytes_saved"] // copies if copies else 0,
                   layouts=tuple((x["name"], tuple(x["shape"]), tuple(x["stride"])) for x in d.get("layouts", ())))


@dataclass(frozen=True)
class Overlap:
    a: tuple[str, ...]  # names of one extent
    b: tuple[str, ...]  # names of the other
    kind: str  # "nested" (b inside a) | "partial"
    exact: bool  # False when the element-level check was too large to run


# Every non-empty fact under its identity (see TensorFact.identity), in the facts' order.
IdentityIndex = dict[tuple, list[TensorFact]]


def group_by_identity(facts: Iterable[TensorFact]) -> IdentityIndex:
    """Facts that are the same memory, grouped. Build it once per report and pass it on:
    every analysis below accepts it, so a 100,000-tensor checkpoint is grouped once, not per analysis."""
    groups: IdentityIndex = defaultdict(list)
    for f in facts:
        if f.numel == 0:
            continue  # empty tensors own no bytes; they cannot tie
        groups[f.identity].append(f)
    return groups


def _is_transpose(a: TensorFact, b: TensorFact) -> bool:
    return len(a.shape) >= 2 and a.shape == b.shape[::-1] and a.stride == b.stride[::-1]


def classify(members: list[TensorFact]) -> str:
    first = members[0]
    layouts = {(m.shape, m.stride) for m in members}
    if len(layouts) > 1:
        if len(layouts) == 2 and all(_is_transpose(first, m) or (m.shape, m.stride) == (first.shape, first.stride)
                                     for m in members):
            return TRANSPOSED_ALIAS
        return RESTRIDED_ALIAS
    objects = {m.obj_id for m in members}
    if None in objects:
        return SHARED_STORAGE
    if len(objects) == 1:
        return SAME_PARAMETER
    return DISTINCT_PARAMETERS


def find_tie_groups(facts: Iterable[TensorFact], by_identity: IdentityIndex | None = None) -> list[TieGroup]:
    """Every set of two or more names over the same memory, in a stable order.

    Args:
        facts: the facts of one subject.
        by_identity: ``group_by_identity(facts)``, when the caller already built it.

    Returns:
        The tie groups, largest first.
    """
    out = []
    for members in (by_identity if by_identity is not None else group_by_identity(facts)).values():
        if len(members) < 2:
            continue
        first = members[0]
        out.append(
            TieGroup(
                names=tuple(sorted(m.name for m in members)),
                kind=classify(members),
                shape=first.shape,
                dtype=first.dtype,
                numel=first.numel,
                itemsize=first.itemsize,
                devices=tuple(sorted({m.device for m in members})),
                layouts=tuple(sorted((m.name, m.shape, m.stride) for m in members)),
                objects=len({m.obj_id for m in members if m.obj_id is not None}),
            )
        )
    return sorted(out, key=lambda g: (-g.nbytes, g.names))


# Element-level overlap checks enumerate offsets; past this many elements we stay conservative.
_EXACT_LIMIT = 1 << 22


def _offsets(f: TensorFact):
    off = np.array([f.byte_start // f.itemsize], dtype=np.int64)
    for n, s in zip(f.shape, f.stride, strict=True):
        off = (off[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    return off


def _elements_overlap(a: TensorFact, b: TensorFact) -> tuple[bool, bool]:
    """(overlap, exact) for two extents whose byte ranges intersect."""
    if a.dense and b.dense:
        return True, True
    if a.itemsize != b.itemsize or a.numel > _EXACT_LIMIT or b.numel > _EXACT_LIMIT:
        return True, False

    return bool(np.intersect1d(_offsets(a), _offsets(b), assume_unique=False).size), True


def find_overlaps(facts: Iterable[TensorFact], by_identity: IdentityIndex | None = None) -> list[Overlap]:
    """Extents of one storage that intersect without being identical.

    Args:
        facts: the facts of one subject.
        by_identity: ``group_by_identity(facts)``, when the caller already built it.

    Returns:
        Every intersecting pair, sorted by names. The sweep costs O(n log n) plus the pairs it
        reports: a memory-mapped file is one storage holding every tensor, so anything that
        copied or rescanned the storage's list per extent would be quadratic there.
    """
    groups = by_identity if by_identity is not None else group_by_identity(facts)
    by_storage: dict = defaultdict(list)
    for members in groups.values():
        rep = members[0]
        if rep.extent is not None:
            by_storage[rep.storage].append(rep)
    out = []
    for extents in by_storage.values():
        extents.sort(key=lambda e: (e.byte_start, -e.byte_end))
        n = len(extents)
        # Sweep: each extent against the following ones that start before it ends.
        for i, a in enumerate(extents):
            j = i + 1
            while j < n and extents[j].byte_start < a.byte_end:
                b = extents[j]
                j += 1
                overlap, exact = _elements_overlap(a, b)
                if not overlap:
                    continue  # interleaved views (e.g. column slices of a fused QKV weight)
                nested = b.byte_end <= a.byte_end and a.dense
                out.append(Overlap(a=_names(groups, a), b=_names(groups, b), kind="nested" if nested else "partial",
                                   exact=exact))
    return sorted(out, key=lambda o: (o.a, o.b))


def _names(groups: IdentityIndex, rep: TensorFact) -> tuple[str, ...]:
    return tuple(sorted(m.name for m in groups[rep.identity]))


def tie_findings(groups: list[TieGroup], overlaps: list[Overlap]) -> list[Finding]:
    found = []
    for g in groups:
        if g.objects > 1:
            found.append(finding("TC002", f"{', '.join(g.names)} are {g.objects} distinct objects over one "
                                          f"memory {list(g.shape)}: their gradients are not shared", g.names))
        if g.kind in (TRANSPOSED_ALIAS, RESTRIDED_ALIAS):
            desc = "; ".join(f"{n} {list(s)}" for n, s, _ in g.layouts)
            what = "the transpose of one another" if g.kind == TRANSPOSED_ALIAS else "different shapes or strides"
            found.append(finding("TC008", f"{desc} share memory as {what}", g.names))
    for o in overlaps:
        names = o.a + o.b
        if o.kind == "nested":
            found.append(finding("TC007", f"{', '.join(o.b)} lies inside {', '.join(o.a)}", names))
        else:
            qual = "" if o.exact else " (byte ranges intersect; too large to check element by element)"
            found.append(finding("TC003", f"{', '.join(o.a)} and {', '.join(o.b)} partially overlap{qual}", names))
    return found
