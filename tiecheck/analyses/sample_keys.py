"""Samples of tensor content, and the keys that bucket them: what the duplicate and transposed
passes (``duplicates.py``) read and compare, a batch of names at a time.

A sample is a few short runs of a tensor's raw bits, or all of them for a small tensor (the
reader decides, ``whole_sample_bytes``). Samples are keyed (``sample_key``) and bucketed by key: only
names whose keys agree are looked at again. Keys are made and merged a batch at a time, so a
file of a million distinct small tensors costs a few C calls a batch, not a step per name.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress
from typing import Protocol

import numpy as np


class ContentReader(Protocol):
    """Reads tensor content by name; implementations count the bytes they read."""

    bytes_read: int

    def sample(self, name: str) -> bytes:
        """A cheap signature: a few small slices of the raw bits."""

    def is_constant(self, name: str) -> bool:
        """True when every element has the same bits (e.g. a fresh LayerNorm weight)."""

    def equal(self, a: str, b: str) -> bool:
        """Bitwise equality of two tensors of equal dtype and shape, read in chunks."""

    # Optional: ``prefetch_samples(names, transposed=())`` is told what a pass will sample before it samples
    # it, so a reader whose reads cost a round trip each (remote files) can fetch them all at once.
    # Optional: ``samples(names, transposed=None)``, the samples of many names at once (a reader that
    # can read neighbouring tensors together), and ``whole_sample_bytes``: a tensor of at most that
    # many bytes is sampled whole, so equal samples are equal tensors and need no full comparison.


def samples_of(reader: ContentReader, names: Sequence[str], transposed: tuple[int, ...] | None = None) -> list[bytes]:
    """The samples of ``names`` (through a transpose of shape ``transposed``), many at once where the reader can."""
    batch = getattr(reader, "samples", None)
    if batch is not None:
        return batch(names) if transposed is None else batch(names, transposed)
    one = reader.sample if transposed is None else reader.sample_transposed  # type: ignore[attr-defined]
    return [one(n) for n in names]


def each_sample(reader: ContentReader, names: list[str], transposed: tuple[int, ...] | None = None,
                 ) -> Iterator[tuple[str, bytes]]:
    """(name, sample) of each name, read many at a time (``sample_batches``) but never all at once: a
    million small tensors sampled whole would hold gigabytes."""
    for part, sigs in sample_batches(reader, names, transposed):
        yield from zip(part, sigs, strict=True)


SAMPLE_BATCH = 4096  # names sampled at once where nothing asks for progress in between

# Samples up to this many bytes are their own bucket key; a longer one is keyed by its hash (an int),
# so that a million samples of up to 4 KiB do not stay in memory as keys. A hash only buckets: equality
# is decided on bytes (a full comparison, or the samples read again when they are the tensors), so two
# samples that share a hash cost a comparison, never a wrong answer. Python's own hash, not a digest:
# 300,000 blake2b digests of the square-tensor file's samples cost 0.15 s.
KEY_BYTES = 32
Key = bytes | int
_hash = hash  # a name of its own: the tests make every sample collide through it


def sample_key(sig: bytes) -> Key:
    return sig if len(sig) <= KEY_BYTES else _hash(sig)


def prefetch_samples(reader: ContentReader, names: list[str], transposed: Sequence[str] = ()) -> None:
    """Tell ``reader`` what is about to be sampled, where it wants to know (see ``ContentReader``)."""
    prefetch = getattr(reader, "prefetch", None)
    if prefetch is not None and (names or transposed):
        prefetch_samples(names, transposed)


def by_key(batches: Iterable[tuple[Sequence[str], Sequence[bytes]]], itemsize: int,
           ) -> tuple[list[tuple[Key, list[str]]], set[str]]:
    """Names whose sample keys (``sample_key``) agree, in groups of two or more, in the order each
    key was met again; and which of those names have a uniform sample (every element the same bits:
    only those can be constant tensors, and a hash key no longer says so).

    Args:
        batches: (names, their samples), a batch at a time.
        itemsize: bytes of an element.

    Returns:
        (key, names) of each key met more than once; the uniform names among them.

    The keys of samples all of one length (a bucket's are: one dtype, one shape) are kept as one
    array, end to end, and grouped by sorting it: a bucket of a million distinct tensors costs 16
    bytes and a sort step each, not a dict entry and a bytes object. Samples whose lengths differ
    (or are empty) are keyed in a dict, as ``keyed`` keys them.
    """
    names: list[str] = []
    parts: list[np.ndarray] = []  # each batch's keys: samples as (void, length) records, or hashes
    flags: list[np.ndarray] = []  # each batch's uniform flags
    width = None  # the one length of every sample so far
    batches = iter(batches)
    for part, sigs in batches:
        if not sigs:
            continue
        width = len(sigs[0]) if width is None else width
        if not width or min(map(len, sigs)) != width or sum(map(len, sigs)) != width * len(sigs):
            return _by_key_in_a_dict(names, parts, flags, itertools.chain([(part, sigs)], batches), itemsize)
        names += part
        flags.append(_flags(sigs, itemsize))
        parts.append(np.frombuffer(b"".join(sigs), dtype=np.dtype((np.void, width))) if width <= KEY_BYTES
                     else np.fromiter(map(_hash, sigs), dtype=np.int64, count=len(sigs)))
    if not names:
        return [], set()
    keys = np.concatenate(parts)
    del parts
    order = np.argsort(keys, kind="stable")  # equal keys side by side, each run in the names' order
    ordered = keys[order]
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return [], set()
    # Runs of equal keys, in the order a dict walked name by name would meet each key again (its
    # second name's): the groups come out as they always did.
    starts = np.flatnonzero(np.concatenate(([True], ~same))).tolist()
    runs = sorted((int(order[lo + 1]), lo, hi) for lo, hi in zip(starts, [*starts[1:], len(order)], strict=True)
                  if hi - lo > 1)
    uniform_all = np.concatenate(flags)
    out: list[tuple[Key, list[str]]] = []
    uniform: set[str] = set()
    for _, lo, hi in runs:
        at = order[lo:hi].tolist()
        first = at[0]
        out.append((keys[first].tobytes() if keys.dtype.kind == "V" else int(keys[first]), [names[i] for i in at]))
        uniform.update(names[i] for i in at if uniform_all[i])
    return out, uniform


def _flags(sigs: Sequence[bytes], itemsize: int) -> np.ndarray:
    """``uniform_flags`` as a boolean array, one per sample."""
    got = uniform_flags(sigs, itemsize)
    return np.asarray(got, dtype=bool) if len(got) else np.zeros(len(sigs), dtype=bool)


def _by_key_in_a_dict(names: list[str], parts: list[np.ndarray], flags: list[np.ndarray],
                      rest: Iterable[tuple[Sequence[str], Sequence[bytes]]], itemsize: int,
                      ) -> tuple[list[tuple[Key, list[str]]], set[str]]:
    """``by_key`` for samples of lengths that differ: the names keyed so far (``names``, their keys as
    ``parts``) and the ``rest`` merged in a dict."""
    first: dict[Key, str] = {}
    shared: dict[Key, list[str]] = {}
    so_far = [k.tobytes() if keys.dtype.kind == "V" else k for keys in parts
              for k in (keys if keys.dtype.kind == "V" else keys.tolist())]
    _merge(first, shared, names, so_far)
    uniform = set(compress(names, np.concatenate(flags).tolist())) if flags else set()
    for part, sigs in rest:
        uniform.update(compress(part, uniform_flags(sigs, itemsize)))
        _merge(first, shared, part, keys_of(sigs))
    return list(shared.items()), {n for group in shared.values() for n in group if n in uniform}


def keyed(batches: Iterable[tuple[Sequence[str], Sequence[bytes]]], itemsize: int,
          ) -> tuple[dict[Key, str], dict[Key, list[str]], set[str]]:
    """(each key's first name, the names of each key met more than once, the names whose sample is
    uniform) of (names, their samples) batches: the keys in a dict, for a caller that looks keys up."""
    first: dict[Key, str] = {}
    shared: dict[Key, list[str]] = {}
    uniform: set[str] = set()
    for names, sigs in batches:
        uniform.update(compress(names, uniform_flags(sigs, itemsize)))
        _merge(first, shared, names, keys_of(sigs))
    return first, shared, uniform


def _merge(first: dict[Key, str], shared: dict[Key, list[str]], names: Sequence[str], keys: Sequence[Key]) -> None:
    """Each name under its key: a key's first name in ``first``, a list in ``shared`` only for a key met
    again (100,000 distinct tensors cost a dict entry each). A batch whose keys are all new is added
    whole (one dict built and merged in C); only a batch with a key met before is walked name by name."""
    fresh = dict(zip(keys, names, strict=True))
    if len(fresh) == len(names) and first.keys().isdisjoint(fresh):
        first.update(fresh)
        return
    for n, key in zip(names, keys, strict=True):
        prev = first.setdefault(key, n)
        if prev != n:
            shared.setdefault(key, [prev]).append(n)


def keys_of(sigs: Sequence[bytes]) -> Sequence[Key]:
    """``sample_key`` of each sample (the samples themselves when they are all short enough)."""
    if max(map(len, sigs), default=0) <= KEY_BYTES:
        return sigs
    hashed = _hash
    return [sig if len(sig) <= KEY_BYTES else hashed(sig) for sig in sigs]


def sample_batches(reader: ContentReader, names: list[str], transposed: tuple[int, ...] | None = None,
             ) -> Iterator[tuple[list[str], list[bytes]]]:
    """(names, their samples), ``SAMPLE_BATCH`` names at a time (``each_sample``, a batch at a time)."""
    for lo in range(0, len(names), SAMPLE_BATCH):
        part = names[lo:lo + SAMPLE_BATCH]
        yield part, samples_of(reader, part, transposed)


def uniform_flags(sigs: Sequence[bytes], itemsize: int) -> Iterable[bool]:
    """``is_uniform`` of each sample: at once, over a (samples, elements, bytes) array, when they are all
    of one length (a bucket's are: one dtype, one shape), else one by one."""
    size = len(sigs[0]) if sigs else 0
    # One length throughout: the shortest is the first's and they add up to as many of it.
    if not sigs or size <= itemsize or size % itemsize or min(map(len, sigs)) != size \
            or sum(map(len, sigs)) != size * len(sigs):
        return [is_uniform(s, itemsize) for s in sigs]
    rows = np.frombuffer(b"".join(sigs), dtype=np.uint8).reshape(len(sigs), size // itemsize, itemsize)
    # The second element first: most samples differ there, and only the others are compared whole.
    maybe = np.flatnonzero((rows[:, 1, :] == rows[:, 0, :]).all(axis=1))
    if not maybe.size:
        return ()
    same = np.zeros(len(sigs), dtype=bool)
    same[maybe] = (rows[maybe] == rows[maybe, :1, :]).all(axis=(1, 2))
    return same.tolist() if same.any() else ()


def is_uniform(sample: bytes, itemsize: int) -> bool:
    """Every element of the sample has the first one's bits (compared as one string: C speed)."""
    n = len(sample)
    return n <= itemsize or (n % itemsize == 0 and sample == sample[:itemsize] * (n // itemsize))


