"""``by_key`` takes samples a batch at a time and merges a batch of new keys whole: its answer must be
the one a walk over every (name, sample) gives, whatever the batches, lengths and element sizes."""

from __future__ import annotations

import random

import pytest

from tiecheck.analyses.sample_keys import by_key, is_uniform, sample_key


def _walked(pairs: list[tuple[str, bytes]], itemsize: int) -> tuple[list[tuple[bytes, list[str]]], set[str]]:
    """The answer name by name: each key's first name, a list for each key met again, and the uniform
    names among those lists (the only names whose uniformity is asked: a group's)."""
    first: dict[bytes, str] = {}
    shared: dict[bytes, list[str]] = {}
    uniform = {n for n, sig in pairs if is_uniform(sig, itemsize)}
    for n, sig in pairs:
        key = sample_key(sig)
        prev = first.setdefault(key, n)
        if prev != n:
            shared.setdefault(key, [prev]).append(n)
    return list(shared.items()), {n for group in shared.values() for n in group if n in uniform}


def _batches(pairs, sizes):
    out, lo = [], 0
    for size in sizes:
        part = pairs[lo:lo + size]
        out.append(([n for n, _ in part], [s for _, s in part]))
        lo += size
    assert lo == len(pairs)
    return out


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("length", [0, 1, 4, 8, 16, 32, 40, 256, 4096])
@pytest.mark.parametrize("seed", range(4))
def test_batched_keys_agree_with_a_walk_over_every_sample(itemsize, length, seed):
    rng = random.Random(seed * 1000 + length * 10 + itemsize)
    pool = [bytes(rng.randrange(4) for _ in range(length)) for _ in range(6)]  # few values: many repeats
    pool.append(bytes(rng.randrange(256) for _ in range(itemsize)) * (length // itemsize) + b"\0" * (length % itemsize))
    pairs = [(f"t{i}", rng.choice(pool) if rng.random() < 0.3 else bytes(rng.randrange(256) for _ in range(length)))
             for i in range(120)]
    want = _walked(pairs, itemsize)
    # One batch, one per name, and uneven ones: a repeat within a batch, and across batches.
    for sizes in ([120], [1] * 120, [7, 50, 3, 60]):
        assert by_key(_batches(pairs, sizes), itemsize) == want


def test_samples_of_mixed_lengths_in_one_batch_or_the_next():
    pairs = [("a", b"\1\1\1\1"), ("b", b"\1\1"), ("c", b"\1\1\1\1"), ("d", b"\1\2\1\2"), ("e", b""), ("f", b"\1\2"),
             ("g", b"\1\1"), ("h", b"\3" * 40), ("i", b"\3" * 40), ("j", b"\1\1\1\1")]
    for itemsize in (1, 2, 4):
        for sizes in ([10], [1] * 10, [4, 6], [3, 3, 4]):
            assert by_key(_batches(pairs, sizes), itemsize) == _walked(pairs, itemsize)


def test_a_key_met_in_a_later_batch_joins_the_first_name():
    pairs = [("x", b"same"), ("y", b"other"), ("z", b"same")]
    shared, _ = by_key(_batches(pairs, [2, 1]), 1)
    assert shared == [(b"same", ["x", "z"])]
