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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, Protocol

from tiecheck.analyses.sample_keys import (
    SAMPLE_BATCH,
    ContentReader,
    Key,
    by_key,
    each_sample,
    is_uniform,
    keyed,
    keys_of,
    prefetch_samples,
    sample_batches,
    samples_of,
    uniform_flags,
)
from tiecheck.analyses.ties import IdentityIndex, group_by_identity
from tiecheck.facts import TensorFact, assignment
from tiecheck.findings import RULES, Finding, finding


@dataclass(frozen=True)
class DuplicateGroup:
    names: tuple[str, ...]  # one name per separate memory; sorted
    aliases: tuple[tuple[str, ...], ...]  # every name of each member, tied names included
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    constant: bool  # every element equal: equal by construction (e.g. init), rarely a broken tie
    buffers: tuple[str, ...] = ()  # the members that are a module's buffers (no name of theirs is a parameter)

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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DuplicateGroup:
        """A group as a report's JSON holds it: each member one name (the aliases and buffers stay the analysis's)."""
        names = tuple(d["names"])
        return cls(names=names, aliases=tuple((n,) for n in names), shape=tuple(d["shape"]), dtype=d["dtype"],
                   nbytes=d["bytes_wasted"] // (len(names) - 1) if len(names) > 1 else 0,
                   constant=bool(d.get("constant")))


@dataclass
class _Tally:
    """What a content pass counts while it runs; its stats are these counts, frozen, at the end."""

    tensors: int = 0
    buckets: int = 0
    sampled: int = 0
    full_comparisons: int = 0


@dataclass(frozen=True)
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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContentStats:
        return cls(**{k: int(d.get(k, 0)) for k in ("tensors", "buckets", "sampled", "full_comparisons",
                                                      "bytes_total", "bytes_read")})


def _representatives(facts: Iterable[TensorFact], by_identity: IdentityIndex | None = None,
                     ) -> dict[str, list[TensorFact]]:
    """Every separate memory's facts, keyed by the name that stands for it, whose fact comes first.

    The index's own list where it already starts with that fact (shared, not copied), as it does for
    every memory of one name: a checkpoint of a million tensors would otherwise hold a million more
    lists or tuples at the content pass's peak."""
    if by_identity is None:
        by_identity = group_by_identity(facts)
    # Most memories have one name: those in one comprehension (a million of them), the others after.
    reps = {m[0].name: m for m in by_identity.values()
            if len(m) == 1 and m[0].persistent and m[0].storage is not None}
    for members in by_identity.values():
        first = members[0]
        if first.storage is None or len(members) == 1:
            continue  # no memory to read (meta device), or one name: taken above if it is saved
        if not all(m.persistent for m in members):
            # A non-persistent buffer is never saved: not a copy anything stores or a tie could save.
            members = [m for m in members if m.persistent]
            if not members:
                continue
        rep = members[0] if len(members) == 1 else min(members, key=_name)
        reps[rep.name] = members if rep is members[0] else [rep, *(m for m in members if m is not rep)]
    return reps


def _name(f: TensorFact) -> str:
    return f.name


def _names(members: list[TensorFact]) -> tuple[str, ...]:
    return tuple(sorted(m.name for m in members))


def find_untied_duplicates(facts: Iterable[TensorFact], reader: ContentReader,
                           by_identity: IdentityIndex | None = None,
                           progress: Callable[[int, int], None] | None = None,
                           ) -> tuple[list[DuplicateGroup], ContentStats]:
    """Groups of separate memories with equal dtype, shape and bits.

    Args:
        facts: the facts of one subject.
        reader: reads the tensors' content by name.
        by_identity: ``group_by_identity(facts)``, when the caller already built it.
        progress: called as ``progress(sampled, to_sample)`` as tensors are sampled: about every
            1% of them (its cost stays negligible at 100,000 tensors), and after the last.

    Returns:
        The duplicate groups, largest first, and what the pass read.
    """
    reps = _representatives(facts, by_identity)
    stats = _Tally(tensors=len(reps))
    start_read = reader.bytes_read
    buckets: dict[tuple, list[str]] = defaultdict(list)
    bytes_total = 0
    for name, members in reps.items():
        f = members[0]
        # Equal shape and dtype: values are compared element by element, whatever the strides.
        buckets[(f.dtype, f.shape)].append(name)
        bytes_total += f.numel * f.itemsize

    groups: list[DuplicateGroup] = []
    to_sample = sum(len(names) for names in buckets.values() if len(names) > 1)
    every = max(1, to_sample // 100)
    whole = getattr(reader, "whole_sample_bytes", 0)

    def sample_all(names: list[str]) -> Iterator[tuple[list[str], list[bytes]]]:
        """(names, their samples) in batches that end where a progress call is due (every 1%, at most
        ``SAMPLE_BATCH``): the samples of a bucket are never all held at once."""
        lo = 0
        while lo < len(names):
            part = names[lo:lo + min(SAMPLE_BATCH, every - stats.sampled % every)]
            yield part, samples_of(reader, part)
            lo += len(part)
            stats.sampled += len(part)
            if progress is not None and (stats.sampled % every == 0 or stats.sampled == to_sample):
                progress(stats.sampled, to_sample)

    def group(same: list[str], constant: bool) -> DuplicateGroup:
        f = reps[same[0]][0]
        same = sorted(same)
        return DuplicateGroup(names=tuple(same), aliases=tuple(_names(reps[n]) for n in same),
                              shape=f.shape, dtype=f.dtype, nbytes=f.nbytes, constant=constant,
                              buffers=tuple(n for n in same if all(m.role == "buffer" for m in reps[n])))

    prefetch_samples(reader, [n for names in buckets.values() if len(names) > 1 for n in names])
    for (_dtype, _shape), names in sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if len(names) < 2:
            continue
        stats.buckets += 1
        f0 = reps[names[0]][0]
        itemsize = f0.itemsize
        # Sampled in the facts' order (the file's, for a file), not sorted by name: only the few names
        # whose samples agree are sorted, which orders the comparisons as a sorted bucket would.
        shared, uniform = by_key(sample_all(names), itemsize)
        for key, candidates in shared:
            candidates = sorted(candidates)
            if f0.nbytes <= whole and all(reps[n][0].dense for n in candidates):
                # Sampled whole: equal samples are equal tensors (a view that rereads its elements is
                # left to ``equal``, which declines it as before). A hash key is checked on the bytes.
                if not (isinstance(key, bytes) and len(key) == f0.nbytes):
                    stats.sampled += len(candidates)
                for sig, same in _exact(reader, candidates, key, f0.nbytes):
                    groups.append(group(same, f0.numel > 1 and is_uniform(sig, itemsize)))
                continue
            remaining = list(candidates)
            while len(remaining) > 1:
                pivot, rest = remaining[0], remaining[1:]
                same, differ = [pivot], []
                for other in rest:
                    stats.full_comparisons += 1
                    (same if reader.equal(pivot, other) else differ).append(other)
                if len(same) > 1:
                    # Only a uniform sample can come from a constant tensor: skip the read otherwise.
                    groups.append(group(same, f0.numel > 1 and pivot in uniform and reader.is_constant(pivot)))
                remaining = differ
    return sorted(groups, key=lambda g: (-g.nbytes, g.names)), ContentStats(
        tensors=stats.tensors, buckets=stats.buckets, sampled=stats.sampled, full_comparisons=stats.full_comparisons,
        bytes_total=bytes_total, bytes_read=reader.bytes_read - start_read)


def _exact(reader: ContentReader, names: list[str], key: Key, nbytes: int) -> list[tuple[bytes, list[str]]]:
    """Names of ``nbytes`` each, sampled whole, whose samples share ``key``, grouped by their bytes: a
    sample that is its own key is one group as it stands; under a hash, the samples are read again."""
    if isinstance(key, bytes) and len(key) == nbytes:
        return [(key, names)]
    by_bytes: dict[bytes, list[str]] = {}
    for n, sig in each_sample(reader, names):
        by_bytes.setdefault(sig, []).append(n)
    return [(sig, same) for sig, same in by_bytes.items() if len(same) > 1]


@dataclass(frozen=True)
class Relation:
    """Why two names might be one tensor, and how sure that is.

    ``broken``: the architecture or a declaration makes them one tensor (a config's
    ``tie_word_embeddings=true``, a class's ``_tied_weights_keys``, an alias map, or an input
    embedding and its output projection where nothing says untied), so separate equal copies are a
    broken tie (an error). Otherwise the names are of a kind usually tied (two embeddings of one
    vocabulary, a head a config keeps untied): equal copies may be a broken tie or a wasted copy (a
    warning).
    """

    names: tuple[str, str]
    broken: bool
    why: str  # the finding's message ends "...; <why>": what relates the pair and what that makes the copy
    config_ties: bool | None = None  # what the config's tie_word_embeddings says, where it speaks of the pair


def expected_relations(expected: Iterable[Sequence[str]]) -> list[Relation]:
    """The pairs the user expects tied (``--expect-tied``, ``expect_tied=``): separate equal copies of them
    are a broken tie, whatever roles or declarations say (the expectation's own TC009 reports the tie)."""
    out = []
    for names in expected:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                out.append(Relation(tuple(sorted((a, b))), True,
                                    f"an expectation names them tied ({', '.join(names)}), so this is a broken tie"))
    return out


def relation_of(g: DuplicateGroup, relations: Iterable[Relation]) -> Relation | None:
    """The first relation whose two names fall in two different members of the group (a broken one first)."""
    member = {n: i for i, names in enumerate(g.aliases) for n in names}
    found = None
    for r in relations:
        a, b = r.names
        if a in member and b in member and member[a] != member[b]:
            if r.broken:
                return r
            found = found or r
    return found


def duplicate_findings(groups: list[DuplicateGroup], relations: Iterable[Relation] = ()) -> list[Finding]:
    """TC005 for each duplicate group, with the severity its relation gives it.

    Args:
        groups: the untied duplicates.
        relations: name pairs that are, or are usually, one tensor (see :class:`Relation`).

    Returns:
        One finding per group: an error where a relation makes the names one tensor (a broken tie), a
        warning where they are of a kind usually tied, and info where nothing relates them (equal by
        construction: a deterministic initialisation, a frozen sinusoidal table, a copied layer). None for
        a constant-valued group, or one whose copies are buffers nothing ties (constants a module
        computes, not weights).
    """
    relations = list(relations)
    out = []
    for g in groups:
        if g.constant:
            continue  # e.g. every fresh LayerNorm weight is all ones: equal by construction
        rel = relation_of(g, relations)
        if rel is None and len(g.names) - len(g.buffers) < 2:
            continue  # buffers (position ids, masks, frequency tables): computed, not trained
        message = (f"{', '.join(g.names)} hold equal {g.dtype} {list(g.shape)} content in "
                   f"separate memory ({g.bytes_wasted:,} bytes wasted)")
        if rel is None:
            out.append(finding("TC005", message + "; nothing ties or relates these names, so this is no broken tie",
                               g.names, severity="info", hint=UNRELATED_HINT))
            continue
        message += f"; {rel.why}"
        out.append(finding("TC005", message, g.names, severity="error" if rel.broken else "warning",
                           hint=_hint(g, rel)))
    return out


UNRELATED_HINT = ("Nothing to do where they are equal by construction (a deterministic initialisation such as "
                  "Mamba's A_log, a frozen sinusoidal table, a copied layer); if one is meant to be the other, tie "
                  "them in code by assigning the Parameter.")


def _hint(g: DuplicateGroup, rel: Relation) -> str:
    here = assignment(g.names)
    if rel.config_ties is False:
        # tie_weights() follows the config, which keeps them apart: it would do nothing here.
        return (f"The config says tie_word_embeddings=false, so `model.tie_weights()` leaves them apart: if they "
                f"are meant to be one tensor, tie them by assignment ({here}) and set tie_word_embeddings=true; "
                f"otherwise nothing to do (the head is its own copy, equal for now).")
    if not rel.broken:
        return f"If they are meant to be one tensor, tie them by assignment ({here}); otherwise drop the copy."
    return f"{RULES['TC005'].hint} Here: {here}"


# -- transposed copies: one 2-D tensor holding another's transpose (shapes swapped) -------------


class TransposeReader(ContentReader, Protocol):
    """A ``ContentReader`` that also reads through a transpose (2-D tensors only)."""

    def sample_transposed(self, name: str) -> bytes:
        """The sample of ``name``'s transpose: the bits of ``t.T`` at the positions ``sample`` reads of a
        tensor of ``t.T``'s shape, so ``sample(a) == sample_transposed(b)`` when ``a`` equals ``b.T``."""

    def equal_transposed(self, a: str, b: str) -> bool:
        """Bitwise equality of ``a`` and ``b.T`` (``b``'s shape is ``a``'s swapped), read in chunks."""


@dataclass(frozen=True)
class TransposedCopy:
    names: tuple[str, str]  # (a, b): b holds a's transpose; a is the one whose shape sorts first
    aliases: tuple[tuple[str, ...], tuple[str, ...]]
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    dtype: str
    nbytes: int  # of one copy: the bytes the second copy wastes

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtype": self.dtype,
                "bytes_wasted": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransposedCopy:
        a, b = d["names"]
        sa, sb = d["shapes"]
        return cls(names=(a, b), aliases=((a,), (b,)), shapes=(tuple(sa), tuple(sb)), dtype=d["dtype"],
                   nbytes=d["bytes_wasted"])


@dataclass(frozen=True)
class TransposeStats:
    tensors: int = 0  # distinct 2-D memories whose (dtype, element count) bucket holds a swapped shape
    buckets: int = 0  # (dtype, shape, swapped shape) pairings looked at
    sampled: int = 0  # samples read (a square tensor is sampled both ways)
    full_comparisons: int = 0
    bytes_read: int = 0

    def to_dict(self) -> dict:
        return {"tensors": self.tensors, "buckets": self.buckets, "sampled": self.sampled,
                "full_comparisons": self.full_comparisons, "bytes_read": self.bytes_read}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransposeStats:
        return cls(**{k: int(d.get(k, 0)) for k in ("tensors", "buckets", "sampled", "full_comparisons", "bytes_read")})


@dataclass(frozen=True)
class ContentPass:
    """The report's ``content_pass``: what the pass that compares tensor values read, and the transposed
    copies it found (the duplicate groups are the report's ``untied_duplicates``); or why it did not run."""

    ran: bool
    reason: str | None = None  # why it did not run
    stats: ContentStats = field(default_factory=ContentStats)
    transposed: TransposeStats | None = None  # None in reports written before the transposed pass
    copies: tuple[TransposedCopy, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        if not self.ran:
            return {"ran": False, "reason": self.reason}
        d: dict[str, Any] = {"ran": True, **self.stats.to_dict()}
        if self.transposed is not None:
            d["transposed"] = {**self.transposed.to_dict(), "copies": [c.to_dict() for c in self.copies]}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContentPass:
        if not d.get("ran"):
            return cls(ran=False, reason=d.get("reason"))
        t = d.get("transposed")
        return cls(ran=True, stats=ContentStats.from_dict(d),
                   transposed=None if t is None else TransposeStats.from_dict(t),
                   copies=tuple(TransposedCopy.from_dict(c) for c in (t or {}).get("copies", ())))


def find_transposed_copies(facts: Iterable[TensorFact], reader: TransposeReader, skip: Iterable[str] = (),
                           by_identity: IdentityIndex | None = None) -> tuple[list[TransposedCopy], TransposeStats]:
    """Separate-memory 2-D tensors whose content equals another's transpose.

    The same discipline as :func:`find_untied_duplicates`: tensors are bucketed by (dtype, element
    count), a bucket is looked at only where a shape meets its swap, each side is sampled (the
    swapped side through its transpose, at the positions the other side's sample reads), and only
    pairs whose samples agree are compared in full, in chunks. Constant tensors are left out (equal
    to any transpose of the same constant by construction).

    Args:
        facts: the tensor facts; names already tied are one tensor.
        reader: reads samples and compares through a transpose.
        skip: names not to consider (e.g. the second member of an untied duplicate group: its
            first member stands for it).
        by_identity: ``group_by_identity(facts)``, when the caller already built it.

    Returns:
        The copies found, largest first, and what was read to find them.
    """
    skipped = set(skip)
    if by_identity is None:
        by_identity = group_by_identity(facts)
    # Only 2-D memories can hold a transpose: the others are left out before anything else is done.
    # (A memory of one name, the common case, is judged by it alone: no generator per memory.)
    matrices = {i: m for i, m in by_identity.items()
                if (len(m[0].shape) == 2 if len(m) == 1 else any(len(f.shape) == 2 for f in m))}
    reps = {n: v for n, v in _representatives((), matrices).items()
            if len(v[0].shape) == 2 and v[0].numel > 1
            and not (skipped and skipped.intersection(m.name for m in v))}
    by_shape: dict[tuple, list[str]] = defaultdict(list)
    for name, members in reps.items():
        f = members[0]
        by_shape[(f.dtype, tuple(f.shape))].append(name)
    stats = _Tally()
    start_read = reader.bytes_read
    copies: list[TransposedCopy] = []
    compared: set[tuple[str, str]] = set()
    constant: dict[str, bool] = {}

    def is_constant(name: str, sig: bytes) -> bool:
        """Constant tensors equal any transpose of the same constant: left out, each read at most once
        (and only when its sample is uniform), so n zero matrices cost n reads, not n² comparisons."""
        if name not in constant:
            constant[name] = is_uniform(sig, reps[name][0].itemsize) and reader.is_constant(name)
        return constant[name]

    def unless_constant(part: list[str], sigs: list[bytes], size: int) -> tuple[list[str], list[bytes]]:
        """The batch without its constant tensors (only a uniform sample can be one's)."""
        flags = uniform_flags(sigs, size)
        if not any(flags):
            return part, sigs
        kept = [(n, sig) for n, sig, uniform in zip(part, sigs, flags, strict=True)
                if not (uniform and is_constant(n, sig))]
        return [n for n, _ in kept], [sig for _, sig in kept]

    # The pairings the loop below looks at: a shape whose swap is present, from the side that sorts first.
    pairings = [(dtype, shape) for dtype, shape in by_shape if shape <= shape[::-1] and (dtype, shape[::-1]) in by_shape]
    prefetch_samples(reader, [n for key in pairings for n in by_shape[key]],
              [n for dtype, shape in pairings for n in by_shape[(dtype, shape[::-1])]])
    for (dtype, shape), names in sorted(by_shape.items()):
        swapped = shape[::-1]
        if shape > swapped or (dtype, swapped) not in by_shape:
            continue  # each (shape, swapped) pairing once, from the side whose shape sorts first
        others = by_shape[(dtype, swapped)]
        stats.buckets += 1
        stats.tensors += len(names) + (len(others) if swapped != shape else 0)
        # As in by_key: a key's first name in one dict, a list only for a key met again (100,000
        # distinct matrices cost a dict entry each), a batch of new keys merged whole; a constant
        # tensor (read only where its sample is uniform) left out first.
        size = reps[names[0]][0].itemsize
        names = sorted(names)
        first, more, _ = keyed((unless_constant(part, sigs, size) for part, sigs in sample_batches(reader, names)), size)
        stats.sampled += len(names)
        for part, sigs in sample_batches(reader, names if swapped == shape else sorted(others), swapped):
            stats.sampled += len(part)
            keys = keys_of(sigs)
            for b, sig, key in compress(zip(part, sigs, keys, strict=True), map(first.__contains__, keys)):
                if is_constant(b, sig):
                    continue
                for a in more.get(key) or (first[key],):
                    if a == b:
                        continue  # a square tensor equal to its own transpose is symmetric, not a copy
                    # equality through a transpose is symmetric
                    x, y = (a, b) if swapped != shape else sorted((a, b))
                    if (x, y) in compared:
                        continue  # a square pair meets itself both ways: compared once
                    compared.add((x, y))
                    stats.full_comparisons += 1
                    if reader.equal_transposed(x, y):
                        fx = reps[x][0]
                        copies.append(TransposedCopy(names=(x, y), aliases=(_names(reps[x]), _names(reps[y])),
                                                     shapes=(tuple(fx.shape), tuple(swapped)), dtype=dtype,
                                                     nbytes=fx.nbytes))
    return sorted(copies, key=lambda c: (-c.nbytes, c.names)), TransposeStats(
        tensors=stats.tensors, buckets=stats.buckets, sampled=stats.sampled, full_comparisons=stats.full_comparisons,
        bytes_read=reader.bytes_read - start_read)


def transposed_findings(copies: list[TransposedCopy], reported: Iterable[Iterable[str]] = ()) -> list[Finding]:
    """TC005 for each transposed copy, except pairs a loader already reported (the ONNX graph pass)."""
    seen = [set(r) for r in reported]
    out = []
    for c in copies:
        a, b = c.names
        if any(set(c.aliases[0]) & r and set(c.aliases[1]) & r for r in seen):
            continue
        out.append(finding("TC005", f"{b} {list(c.shapes[1])} holds the transpose of {a} {list(c.shapes[0])} "
                                    f"({c.dtype}) in separate memory ({c.nbytes:,} bytes wasted): a transposed "
                                    f"copy, e.g. a head stored as Eᵀ by a converter or constant folding",
                           c.names, hint="Tie the head to the embedding and let it read the embedding transposed "
                                         "(`F.linear(x, emb.weight)` or `x @ emb.weight.T`), or drop the copy and "
                                         "re-tie after loading."))
    return out
