"""Runs of small tensors that lie end to end in a file, read together and cut into their samples.

The content pass samples a small tensor whole (``content.WHOLE_BYTES``): the samples of many such
tensors side by side in a file are one read, not one a tensor, and a run of small matrices sampled
through a transpose is transposed as one array.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np

# Adjacent small tensors of one file are read together, at most this many bytes a read.
BATCH_BYTES = 1 << 20


def transposed_whole(raw: bytes, count: int, rows: int, cols: int, size: int) -> bytes:
    """The bytes of ``count`` (rows, cols) tensors of ``size``-byte elements, laid end to end in
    ``raw``, each replaced by its transpose's: the samples of tensors sampled whole, read through a
    transpose (one strided copy for the lot, not an element at a time).

    NumPy, over elements as opaque ``size``-byte values: torch's strided copy of the same bytes
    (a uint8 view with the element as its last dimension) took 25 times as long, 8 ms a MiB,
    and was most of the transposed pass over 100,000 small square matrices."""
    elements = np.frombuffer(raw, dtype=np.dtype((np.void, size)), count=count * rows * cols)
    return elements.reshape(count, rows, cols).transpose(0, 2, 1).tobytes()


def file_runs(reads: list[tuple[int, int, int, int, int]]) -> Iterator[tuple[int, int, int, int, int, bool]]:
    """(fd, lo, hi, first, end, uniform) for each run of ``reads`` (sorted (fd, start, nbytes, itemsize,
    index) tuples) that lie end to end in one file, at most ``BATCH_BYTES`` a run: ``reads[first:end]``
    are read as bytes ``lo:hi``; ``uniform`` when they are all of one size and one element size."""
    fd = lo = hi = first = -1
    shape = None
    uniform = True
    for k, (f, start, nbytes, size, _) in enumerate(reads):
        if f != fd or start != hi or hi - lo >= BATCH_BYTES:
            if k:
                yield fd, lo, hi, first, k, uniform
            fd, lo, hi, first, shape, uniform = f, start, start + nbytes, k, (nbytes, size), True
        else:
            hi += nbytes
            uniform = uniform and (nbytes, size) == shape
    if reads:
        yield fd, lo, hi, first, len(reads), uniform


def read_runs(pread: Callable[[int, int], bytes], starts: np.ndarray, nbytes: int, size: int,
              transposed: tuple[int, int] | None = None) -> list[bytes]:
    """The bytes of tensors of ``nbytes`` each (``size``-byte elements) at file offsets ``starts``, in
    the order of ``starts``: runs of them lying end to end are read together, at most ``BATCH_BYTES``
    a read, and cut at once; with ``transposed`` (their one shape), each read through its transpose.

    Args:
        pread: reads ``(n, offset)``: exactly n bytes.
        starts: int64 offsets, one per tensor.
        nbytes: bytes of each tensor.
        size: bytes of an element.
        transposed: None, or the (rows, cols) shape of every tensor, to read each as its transpose.

    Returns:
        One bytes object per offset.
    """
    in_order = bool((starts[1:] >= starts[:-1]).all())
    order = None if in_order else np.argsort(starts, kind="stable")
    ordered = starts if in_order else starts[order]
    # Where a run of tensors lying end to end breaks: a read never spans a break.
    bounds = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1] + nbytes) + 1).tolist(), len(starts)]
    per = max(1, BATCH_BYTES // nbytes)
    got: list[bytes] = []
    for lo, hi in itertools.pairwise(bounds):
        for k in range(lo, hi, per):
            count = min(per, hi - k)
            buf = pread(count * nbytes, int(ordered[k]))
            if transposed is not None:
                buf = transposed_whole(buf, count, *transposed, size)
            got += [buf[j:j + nbytes] for j in range(0, count * nbytes, nbytes)]
    if order is None:
        return got
    out: list[bytes] = [b""] * len(starts)
    for i, sample in zip(order.tolist(), got, strict=True):
        out[i] = sample
    return out
