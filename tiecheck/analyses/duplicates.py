"""Untied duplicates: equal dtype, shape and content in separate memory (a broken tie).

Reading every byte of a multi-GB checkpoint to find them would cost more than loading it.
So: names already tied are one tensor; tensors are bucketed by (dtype, shape) and only
buckets with two or more members are looked at; inside a bucket a few small samples of each
tensor rule out most pairs; only pairs whose samples agree are compared in full, in
bounded-size chunks. The content itself is read through a ``ContentReader``, so this module
stays free of torch and can be tested with hand-made readers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Protocol

from tiecheck.analyses.ties import IdentityIndex, group_by_identity
from tiecheck.facts import TensorFact
from tiecheck.findings import RULES, Finding, finding
from tiecheck.guard.expect import assignment


class ContentReader(Protocol):
    """Reads tensor content by name; implementations count the bytes they read."""

    bytes_read: int

    def sample(self, name: str) -> bytes:
        """A cheap signature: a few small slices of the raw bits."""

    def is_constant(self, name: str) -> bool:
        """True when every element has the same bits (e.g. a fresh LayerNorm weight)."""

    def equal(self, a: str, b: str) -> bool:
        """Bitwise equality of two tensors of equal dtype and shape, read in chunks."""


@dataclass(frozen=True)
class DuplicateGroup:
    names: tuple[str, ...]  # one name per separate memory; sorted
    aliases: tuple[tuple[str, ...], ...]  # every name of each member, tied names included
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    constant: bool  # every element equal: equal by construction (e.g. init), rarely a broken tie

    @property
    def bytes_wasted(self) -> int:
        return (len(self.names) - 1) * self.nbytes

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bytes_wasted": self.bytes_wasted,
            "constant": self.constant,
        }


@dataclass
class ContentStats:
    tensors: int = 0  # distinct memories considered
    buckets: int = 0  # (dtype, shape) buckets with two or more members
    sampled: int = 0  # tensors sampled
    full_comparisons: int = 0
    bytes_total: int = 0  # bytes of all distinct memories considered
    bytes_read: int = 0  # bytes the reader actually read

    def to_dict(self) -> dict:
        return {
            "tensors": self.tensors,
            "buckets": self.buckets,
            "sampled": self.sampled,
            "full_comparisons": self.full_comparisons,
            "bytes_total": self.bytes_total,
            "bytes_read": self.bytes_read,
        }


def _representatives(facts: Iterable[TensorFact], by_identity: IdentityIndex | None = None,
                     ) -> dict[str, tuple[TensorFact, tuple[str, ...]]]:
    """One fact per separate memory, keyed by its first name, with all its names."""
    if by_identity is None:
        by_identity = group_by_identity(facts)
    reps = {}
    for members in by_identity.values():
        if members[0].storage is None:
            continue  # no memory to read (meta device)
        names = tuple(sorted(m.name for m in members))
        rep = min(members, key=lambda m: m.name)
        reps[rep.name] = (rep, names)
    return reps


def find_untied_duplicates(facts: Iterable[TensorFact], reader: ContentReader,
                           by_identity: IdentityIndex | None = None) -> tuple[list[DuplicateGroup], ContentStats]:
    """Groups of separate memories with equal dtype, shape and bits.

    Args:
        facts: the facts of one subject.
        reader: reads the tensors' content by name.
        by_identity: ``group_by_identity(facts)``, when the caller already built it.

    Returns:
        The duplicate groups, largest first, and what the pass read.
    """
    reps = _representatives(facts, by_identity)
    stats = ContentStats(tensors=len(reps), bytes_total=sum(f.nbytes for f, _ in reps.values()))
    start_read = reader.bytes_read
    buckets: dict[tuple, list[str]] = defaultdict(list)
    for name, (f, _) in reps.items():
        # Equal shape and dtype: values are compared element by element, whatever the strides.
        buckets[(f.dtype, f.shape)].append(name)

    groups: list[DuplicateGroup] = []
    for (dtype, shape), names in sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if len(names) < 2:
            continue
        stats.buckets += 1
        by_sig: dict[bytes, list[str]] = defaultdict(list)
        itemsize = reps[names[0]][0].itemsize
        for n in sorted(names):
            by_sig[reader.sample(n)].append(n)
            stats.sampled += 1
        for sig, candidates in by_sig.items():
            remaining = list(candidates)
            while len(remaining) > 1:
                pivot, rest = remaining[0], remaining[1:]
                same, differ = [pivot], []
                for other in rest:
                    stats.full_comparisons += 1
                    (same if reader.equal(pivot, other) else differ).append(other)
                if len(same) > 1:
                    f = reps[pivot][0]
                    groups.append(DuplicateGroup(
                        names=tuple(sorted(same)),
                        aliases=tuple(reps[n][1] for n in sorted(same)),
                        shape=f.shape, dtype=f.dtype, nbytes=f.nbytes,
                        # Only a uniform sample can come from a constant tensor: skip the read otherwise.
                        constant=f.numel > 1 and _uniform(sig, itemsize) and reader.is_constant(pivot),
                    ))
                remaining = differ
    stats.bytes_read = reader.bytes_read - start_read
    return sorted(groups, key=lambda g: (-g.nbytes, g.names)), stats


def _uniform(sample: bytes, itemsize: int) -> bool:
    first = sample[:itemsize]
    return all(sample[i:i + itemsize] == first for i in range(0, len(sample), itemsize))


def declared_pair(g: DuplicateGroup, must_tie: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """The first pair of ``must_tie`` whose two names fall in two different members of the group."""
    member = {n: i for i, names in enumerate(g.aliases) for n in names}
    for a, b in must_tie:
        if a in member and b in member and member[a] != member[b]:
            return a, b
    return None


def duplicate_findings(groups: list[DuplicateGroup], must_tie: Iterable[tuple[str, str]] = ()) -> list[Finding]:
    """TC005 for each group that is not constant-valued.

    Args:
        groups: the untied duplicates.
        must_tie: name pairs the architecture (or its config) says are one tensor; a group that
            holds one is a broken tie, an error, where a copy nothing declares stays a warning.

    Returns:
        One finding per group.
    """
    must_tie = list(must_tie)
    out = []
    for g in groups:
        if g.constant:
            continue  # e.g. every fresh LayerNorm weight is all ones: equal by construction
        message = (f"{', '.join(g.names)} hold equal {g.dtype} {list(g.shape)} content in "
                   f"separate memory ({g.bytes_wasted:,} bytes wasted)")
        pair = declared_pair(g, must_tie)
        if pair is not None:
            message += (f"; the architecture ties {' and '.join(sorted(pair))} (input embedding and output "
                        f"projection), so this is a broken tie")
        out.append(finding("TC005", message, g.names, severity="error" if pair else None,
                           hint=f"{RULES['TC005'].hint} Here: {assignment(g.names)}"))
    return out
