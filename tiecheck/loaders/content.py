"""Reading tensor content for the duplicate pass, touching as few bytes as possible.

Samples read a few short runs of elements; full comparisons go chunk by chunk so peak memory
stays bounded whatever the tensor size. Tensors memory-mapped from a file are read with
``os.pread`` at their file offset (see ``fileview``): reading through the mapping would make
large parts of the file resident.

A view can have far more elements than its storage holds: a stride of 0 repeats one value along
a dimension (``torch.zeros(1).expand(2**20, 2**20)`` is 2**40 elements over 4 bytes), and
overlapping strides reread stored elements. Such a view is never materialised or walked element
by element: dimensions of stride 0 are compared once (``_broadcast_dims``), and a view whose
remaining elements still outnumber the storage elements they reach is not compared by content
at all (``equal`` says False: a duplicate may be missed, never invented).

A remote file (``loaders/remote.py``) is read through a local stand-in that holds its header and
a hole where its data is; the stand-in's path is registered here (:func:`register_stand_in`) with
the source of its real bytes, so every read of its data is a range request, never the hole. A
pass that knows what it will sample says so first (``prefetch``): a remote file's samples are
then fetched concurrently, since round trips, not bytes, bound them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import torch

from tiecheck.loaders.filecompare import FileRangeCompare
from tiecheck.loaders.fileview import FileSpan
from tiecheck.loaders.sample_runs import file_runs, read_runs, transposed_whole


class HeldBytes(NamedTuple):
    """A contiguous tensor whose bytes a loader holds in memory (``memory_layout(name)``): sampled
    and compared by slicing them, without making a tensor."""

    buffer: Any  # bytes-like
    offset: int
    nbytes: int
    itemsize: int
    layout: tuple  # (dtype, shape): two tensors of equal layout are equal when their bytes are


SAMPLE_RUNS = 4  # short runs per tensor: first, last and two in between
RUN_ELEMENTS = 8
CHUNK_BYTES = 16 << 20
# A tensor of at most this many bytes is its own sample, read whole: reading a page costs what
# reading a few runs of it does, its sample then proves equality (no full comparison), and tiny
# tensors that lie side by side in a file are read together (``samples``).
WHOLE_BYTES = 4096

# Range requests in flight at once while a remote file's samples are prefetched.
PREFETCH_THREADS = 16


class RangeSource(Protocol):
    """The real bytes of a stand-in file, read by range (a remote file: ``loaders/ranges.py``).
    ``pread`` returns exactly ``n`` bytes or raises ``TiecheckError``; it is called from several
    threads at once while samples are prefetched."""

    def pread(self, n: int, offset: int) -> bytes:
        """``n`` bytes from ``offset``."""


_STAND_INS: dict[str, RangeSource] = {}  # stand-in path -> where its bytes are


def register_stand_in(path: str, source: RangeSource) -> None:
    """Reads of ``path``'s data go to ``source`` from now on (``path`` holds no data of its own)."""
    _STAND_INS[path] = source


def release_stand_in(path: str, source: RangeSource) -> None:
    """Forget a stand-in registered by :func:`register_stand_in`, if ``path`` still stands for ``source``
    (a later stand-in may reuse a freed temporary name)."""
    if _STAND_INS.get(path) is source:
        del _STAND_INS[path]


Handle = int | RangeSource  # an open file descriptor, or a stand-in's source

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits as integers, so NaNs compare equal and -0.0 differs from 0.0."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_INT_OF_SIZE[t.element_size()])


def _rows(t: torch.Tensor):
    """Yield contiguous chunks of whole rows, at most ~CHUNK_BYTES each (bounded memory); a row
    larger than that is split the same way along its own first dimension.

    Chunks depend only on shape and dtype, so two tensors of equal shape but different
    layouts (one transposed, say) yield chunks that line up element for element.
    """
    if t.dim() == 0:
        yield t.reshape(1)
        return
    row_bytes = max(1, (t.numel() // max(1, t.shape[0])) * t.element_size())
    if row_bytes > CHUNK_BYTES and t.dim() > 1:
        for i in range(t.shape[0]):
            yield from _rows(t[i])
        return
    step = max(1, CHUNK_BYTES // row_bytes)
    for i in range(0, t.shape[0], step):
        yield t[i:i + step].contiguous().reshape(-1)


def _read(fd: Handle, n: int, off: int) -> bytes:
    """Exactly ``n`` bytes at ``off`` of an open file or a stand-in's source."""
    data = os.pread(fd, n, off) if isinstance(fd, int) else fd.pread(n, off)
    if len(data) != n:
        raise OSError(f"short read at byte {off}: the file changed or is truncated")
    return data


def _broadcast_dims(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions along which a view repeats one value (stride 0, more than one element)."""
    return tuple(d for d, (n, s) in enumerate(zip(t.shape, t.stride(), strict=True)) if s == 0 and n > 1)


def _narrowed(t: torch.Tensor, dims) -> torch.Tensor:
    """``t`` with each of ``dims`` cut to its first element (a view: nothing is copied)."""
    for d in dims:
        t = t.narrow(d, 0, 1)
    return t


def _overlapping(t: torch.Tensor) -> bool:
    """More elements than the storage elements they reach: walking them all would reread stored ones."""
    n = t.numel()
    return n > 1 and n > 1 + sum((k - 1) * abs(s) for k, s in zip(t.shape, t.stride(), strict=True))


def _compared_forms(ta: torch.Tensor, tb: torch.Tensor, constant_along) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two tensors of one shape reduced to what decides their equality without repeating stored
    elements, or None when they differ or cannot be compared that way.

    A dimension of stride 0 in either is compared once: the other tensor must be constant along
    it (``constant_along(t, dims)``), and both are cut to its first element.
    """
    za, zb = _broadcast_dims(ta), _broadcast_dims(tb)
    if za or zb:
        dims = sorted(set(za) | set(zb))
        for t, own in ((ta, za), (tb, zb)):
            rest = [d for d in dims if d not in own]
            if rest and not constant_along(_narrowed(t, own), rest):
                return None
        ta, tb = _narrowed(ta, dims), _narrowed(tb, dims)
    if _overlapping(ta) or _overlapping(tb):
        return None
    return ta, tb


def _sample_starts(n: int) -> list[int]:
    if n <= SAMPLE_RUNS * RUN_ELEMENTS:
        return [0]
    return sorted({round(i * (n - RUN_ELEMENTS) / (SAMPLE_RUNS - 1)) for i in range(SAMPLE_RUNS)})


def sampled_whole(n: int, itemsize: int, whole_bytes: int = WHOLE_BYTES) -> bool:
    """A tensor of ``n`` elements is its own sample: all its bytes, in order (up to ``whole_bytes``)."""
    return n <= SAMPLE_RUNS * RUN_ELEMENTS or n * itemsize <= whole_bytes


def sample_index(n: int, itemsize: int, whole_bytes: int = WHOLE_BYTES) -> list[int]:
    """The flat element indices a sample of ``n`` elements holds, in order."""
    if sampled_whole(n, itemsize, whole_bytes):
        return list(range(n))
    return [s + i for s in _sample_starts(n) for i in range(RUN_ELEMENTS)]


def tensor_layout(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(offset of the first element in its storage, nbytes, itemsize) of a contiguous tensor, for
    pread at its storage's file offset; None for a strided one."""
    if not t.is_contiguous():
        return None
    size = t.element_size()
    return t.storage_offset() * size, t.numel() * size, size


class TorchContentReader:
    """``ContentReader`` over a name -> tensor mapping; counts the bytes it reads.

    ``spans`` gives the file offsets of memory-mapped tensors; those are read with pread.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], spans: Mapping[str, FileSpan] | None = None):
        self.tensors = tensors
        self.spans = spans if spans is not None else {}  # read only: a checkpoint's may hold 100,000 names
        # Tensors of at most this many bytes are sampled whole: two with equal samples are equal. Not
        # for remote files, where every byte is a byte fetched: there samples stay a few runs.
        remote = _STAND_INS and any(s.path in _STAND_INS for s in set(self.spans.values()))
        self.whole_sample_bytes = SAMPLE_RUNS * RUN_ELEMENTS if remote else WHOLE_BYTES
        self.bytes_read = 0
        self._fds: dict[str, Handle] = {}
        self._prefetched: dict[tuple[str, str], bytes] = {}  # ("sample" | "transposed", name) -> sample
        self._equal_known: dict[tuple[str, str], bool] = {}  # (a, b), sorted -> equal
        self._compare_files: FileRangeCompare | None = None  # its two buffers, made at the first full comparison
        where = getattr(tensors, "file_layout", None)
        self._layout = where if callable(where) else None
        # A loader holding a tensor's bytes in memory says where (a HeldBytes), or None.
        held = getattr(tensors, "memory_layout", None)
        self._in_memory = held if callable(held) else None

    def close(self) -> None:
        for fd in self._fds.values():
            if isinstance(fd, int):
                os.close(fd)
        self._fds.clear()
        if self._compare_files is not None:  # its worker thread; the files are this reader's own
            self._compare_files.close()
            self._compare_files = None
        self._prefetched.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- pread path: contiguous tensors whose bytes sit in a file --------------------------
    def _file_range(self, name: str) -> tuple[Handle, int, int, int] | None:
        """(fd, offset of the first element, nbytes, itemsize) when the tensor can be read from its file."""
        span = self.spans.get(name)
        if span is None:
            return None
        # The loader knows the layout without making the tensor, or the tensor says it.
        layout = self._layout(name) if self._layout is not None else tensor_layout(self.tensors[name])
        if layout is None:
            return None  # not one contiguous run of bytes: read through the tensor
        offset, nbytes, itemsize = layout
        fd = self._fds.get(span.path)
        if fd is None:
            remote = _STAND_INS.get(span.path)
            fd = self._fds[span.path] = remote if remote is not None else os.open(span.path, os.O_RDONLY)
        return fd, span.offset + offset, nbytes, itemsize

    def _pread(self, fd: Handle, n: int, off: int) -> bytes:
        data = _read(fd, n, off)
        self.bytes_read += n
        return data

    # -- prefetching a remote file's samples ------------------------------------------------
    def prefetch(self, names: Iterable[str], transposed: Iterable[str] = ()) -> None:
        """Fetch the samples a pass is about to read (``sample`` of ``names``, ``sample_transposed``
        of ``transposed``), for the tensors whose bytes are remote: one range request per run, many
        in flight at once. Local files need nothing (pread costs no round trip)."""
        if not _STAND_INS:
            return
        wanted: list[tuple[tuple[str, str], tuple[Handle, int, int, int], list[tuple[int, int]]]] = []
        for kind, group in (("sample", names), ("transposed", transposed)):
            for name in group:
                rng = self._file_range(name)
                if rng is None or isinstance(rng[0], int):
                    continue
                wanted.append(((kind, name), rng, self._sample_reads(name, rng, kind == "transposed")))
        if not wanted:
            return
        reads = [(rng[0], n, off) for _, rng, runs in wanted for off, n in runs]
        with ThreadPoolExecutor(max_workers=min(PREFETCH_THREADS, len(reads))) as pool:
            got = iter(list(pool.map(lambda r: _read(*r), reads)))
        self.bytes_read += sum(n for _, n, _ in reads)  # counted here: the threads share no counter
        for (kind, name), rng, runs in wanted:
            raw = b"".join(next(got) for _ in runs)
            self._prefetched[(kind, name)] = self._picked(name, raw, rng, kind == "transposed")

    def _sample_reads(self, name: str, rng: tuple[Handle, int, int, int], transposed: bool) -> list[tuple[int, int]]:
        """(offset, nbytes) of each read ``sample`` (or ``sample_transposed``) makes of a file's tensor."""
        _, start, nbytes, size = rng
        n = nbytes // size
        if sampled_whole(n, size, self.whole_sample_bytes):
            return [(start, nbytes)]  # one read; a transposed sample is then picked from it (_picked)
        if transposed:
            # t.T has shape (cols, rows): flat index k of t.T is t[k % rows, k // rows], row-major in the file
            rows, cols = self.tensors[name].shape
            return [(start + ((k % rows) * cols + k // rows) * size, size)
                    for k in sample_index(n, size, self.whole_sample_bytes)]
        return [(start + s * size, RUN_ELEMENTS * size) for s in _sample_starts(n)]

    def _picked(self, name: str, raw: bytes, rng: tuple[Handle, int, int, int], transposed: bool,
                shape: tuple[int, ...] | None = None) -> bytes:
        """The sample from the bytes ``_sample_reads`` read: a small tensor read whole gives its
        transpose's sample by permuting them (``shape``: the tensor's, when the caller knows it)."""
        _, _, nbytes, size = rng
        if not transposed or not sampled_whole(nbytes // size, size, self.whole_sample_bytes):
            return raw
        rows, cols = shape if shape is not None else self.tensors[name].shape
        return transposed_whole(raw, 1, rows, cols, size)

    def _file_chunks(self, fd: Handle, start: int, nbytes: int, itemsize: int):
        step = max(itemsize, CHUNK_BYTES - CHUNK_BYTES % itemsize)
        for off in range(0, nbytes, step):
            yield self._pread(fd, min(step, nbytes - off), start + off)

    def sample(self, name: str) -> bytes:
        """A few runs of the tensor's raw bits; all of them for a tensor of at most ``WHOLE_BYTES``
        (``whole_sample_bytes``: then equal samples are equal tensors)."""
        got = self._prefetched.pop(("sample", name), None)
        if got is not None:
            return got
        rng = self._file_range(name)
        if rng is not None:
            # small enough to be its own sample: one read; else a run at each sample start
            return b"".join([self._pread(rng[0], n, off) for off, n in self._sample_reads(name, rng, False)])
        held = self._held(name)
        if held is not None:  # bytes the loader holds: sliced, no tensor made
            buf, start, nbytes, size, _ = held
            n = nbytes // size
            if sampled_whole(n, size, self.whole_sample_bytes):
                self.bytes_read += nbytes
                return bytes(buf[start:start + nbytes])
            self.bytes_read += SAMPLE_RUNS * RUN_ELEMENTS * size
            return b"".join([bytes(buf[start + s * size:start + (s + RUN_ELEMENTS) * size]) for s in _sample_starts(n)])
        t = self.tensors[name]
        n = t.numel()
        if sampled_whole(n, t.element_size(), self.whole_sample_bytes):  # small enough to be its own sample
            self.bytes_read += n * t.element_size()
            return _bits(t.contiguous().reshape(-1)).numpy().tobytes()
        else:
            starts = torch.tensor(_sample_starts(n))
            idx = (starts[:, None] + torch.arange(RUN_ELEMENTS)[None, :]).reshape(-1)
        if t.is_contiguous():
            vals = t.reshape(-1)[idx]
        else:
            vals = t[torch.unravel_index(idx, t.shape)] if t.dim() else t.reshape(1)
        self.bytes_read += idx.numel() * t.element_size()
        return _bits(vals.contiguous()).numpy().tobytes()

    def samples(self, names: Sequence[str], transposed: tuple[int, int] | None = None) -> list[bytes]:
        """``sample`` of each name, or ``sample_transposed`` of each where ``transposed`` gives their
        one shape. Small tensors lying side by side in a local file are read together, one ``pread``
        per run of them: a checkpoint of a million 16-byte tensors costs a few hundred reads, not a
        million, and a run of small square matrices is transposed in one indexing operation.

        Args:
            names: the tensors to sample.
            transposed: None for ``sample``; else the (rows, cols) shape every name has, for
                ``sample_transposed``.

        Returns:
            The samples, in the order of ``names``.
        """
        together = self._samples_together(names, transposed)
        if together is not None:
            return together
        kind, one = ("sample", self.sample) if transposed is None else ("transposed", self.sample_transposed)
        out: list[bytes] = [b""] * len(names)
        small: list[tuple[int, int, int, int, int]] = []  # (fd, start, nbytes, itemsize, index in names)
        # _file_range, inlined: at a million names each call and tuple it makes shows.
        spans, layout, fds, prefetched = self.spans, self._layout, self._fds, self._prefetched
        whole = self.whole_sample_bytes
        for i, name in enumerate(names):
            span = spans.get(name)
            where = None if span is None or layout is None or (prefetched and (kind, name) in prefetched) \
                else layout(name)
            fd = None if where is None else fds.get(span.path)
            if where is None or fd is None or not isinstance(fd, int) or \
                    (where[1] > whole and where[1] > SAMPLE_RUNS * RUN_ELEMENTS * where[2]):  # not sampled_whole
                out[i] = one(name)  # the one-name path: it also opens a file the first time
            else:
                small.append((fd, span.offset + where[0], where[1], where[2], i))
        small.sort()  # file order; already sorted where names follow it (timsort: one pass)
        for fd, lo, hi, first, end, uniform in file_runs(small):
            buf = self._pread(fd, hi - lo, lo)
            count, nbytes, size = end - first, small[first][2], small[first][3]
            if transposed is not None and uniform and transposed[0] * transposed[1] * size == nbytes:
                # One shape, one element size: the run is a (tensors, rows, cols) array, transposed at once.
                buf = transposed_whole(buf, count, *transposed, size)
            elif transposed is not None:
                uniform = False  # each tensor picked on its own below
            if uniform:
                for r, k in enumerate(range(first, end)):
                    out[small[k][4]] = buf[r * nbytes:(r + 1) * nbytes]
                continue
            for f, start, n, sz, i in small[first:end]:
                raw = buf[start - lo:start - lo + n]
                out[i] = raw if transposed is None else self._picked(names[i], raw, (f, start, n, sz), True, transposed)
        return out

    def _samples_together(self, names: Sequence[str], transposed: tuple[int, int] | None) -> list[bytes] | None:
        """``samples``' common case without a step per name in Python: every name's bytes in one local
        file, found at once by the spans (``file_ranges``: the loader's columns), all of one size and
        each sampled whole. None otherwise, and ``samples`` goes name by name.

        The bytes are read as ``samples`` reads them, runs of tensors that lie end to end at most
        ``BATCH_BYTES`` a read, and cut into samples of one size (transposed a run at a time)."""
        ranges = getattr(self.spans, "file_ranges", None)
        # As name by name: the spans say where a tensor lies only when the tensors say its layout too.
        if ranges is None or self._layout is None or self._prefetched:
            return None
        found = ranges(names)
        if found is None:
            return None
        path, starts, sizes, itemsizes = found
        nbytes, size = int(sizes[0]), int(itemsizes[0])
        if not ((sizes == nbytes).all() and (itemsizes == size).all()) or nbytes % size \
                or not sampled_whole(nbytes // size, size, self.whole_sample_bytes) \
                or (transposed is not None and transposed[0] * transposed[1] * size != nbytes):
            return None
        fd = self._fds.get(path)
        if fd is None:
            if path in _STAND_INS:
                return None  # a remote file: its reads are prefetched, name by name
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        if not isinstance(fd, int):
            return None
        return read_runs(lambda n, off: self._pread(fd, n, off), starts, nbytes, size, transposed)

    def _held(self, name: str) -> HeldBytes | None:
        return self._in_memory(name) if self._in_memory is not None else None

    def is_constant(self, name: str) -> bool:
        held = self._held(name)
        if held is not None:
            view = memoryview(held.buffer)[held.offset:held.offset + held.nbytes]
            self.bytes_read += held.nbytes
            return view.tobytes() == bytes(view[:held.itemsize]) * (held.nbytes // held.itemsize)
        rng = self._file_range(name)
        if rng is not None:
            fd, start, nbytes, size = rng
            first = None
            for chunk in self._file_chunks(fd, start, nbytes, size):
                if first is None:
                    first = chunk[:size]
                if chunk != first * (len(chunk) // size):
                    return False
            return True
        t = self.tensors[name]
        t = _narrowed(t, _broadcast_dims(t))  # a stride-0 dimension repeats what its first element holds
        if _overlapping(t):
            return False  # not walked: the reached storage elements would be read many times over
        first = None
        with torch.no_grad():
            for chunk in _rows(t):
                bits = _bits(chunk)
                self.bytes_read += chunk.numel() * chunk.element_size()
                if first is None:
                    first = bits[:1]
                if not bool((bits == first).all()):
                    return False
        return True

    def equal(self, a: str, b: str) -> bool:
        """Bitwise equality of two tensors, each pair compared once for the reader's life: the
        duplicate pass and the declared layer both ask about an embedding and its head (two full
        reads of 128 MiB each, for one answer). Kept across ``close``, which only drops handles."""
        key = (a, b) if a <= b else (b, a)
        known = self._equal_known.get(key)
        if known is None:
            known = self._equal_known[key] = self._compare(a, b)
        return known

    def _compare(self, a: str, b: str) -> bool:
        ha, hb = self._held(a), self._held(b)
        if ha is not None and hb is not None:
            if ha.layout != hb.layout:
                return False
            self.bytes_read += ha.nbytes + hb.nbytes
            return memoryview(ha.buffer)[ha.offset:ha.offset + ha.nbytes] == \
                memoryview(hb.buffer)[hb.offset:hb.offset + hb.nbytes]
        ta, tb = self.tensors[a], self.tensors[b]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            return False
        ra, rb = self._file_range(a), self._file_range(b)
        if ra is not None and rb is not None and isinstance(ra[0], int) and isinstance(rb[0], int):
            # Local files: two reused buffers compared as memory (a fresh 16 MiB bytes per read
            # measured 4x slower on a 128 MiB embedding and its head).
            if self._compare_files is None:
                self._compare_files = FileRangeCompare()
            before = self._compare_files.bytes_read
            same = self._compare_files.equal_fds(ra[0], ra[1], rb[0], rb[1], ra[2])
            self.bytes_read += self._compare_files.bytes_read - before
            return same
        if ra is not None and rb is not None:
            return all(ca == cb for ca, cb in zip(self._file_chunks(*ra), self._file_chunks(*rb), strict=True))
        forms = _compared_forms(ta, tb, self._constant_along)
        if forms is None:
            return False
        return self._chunks_equal(*forms)

    def _chunks_equal(self, ta: torch.Tensor, tb: torch.Tensor) -> bool:
        with torch.no_grad():
            for ca, cb in zip(_rows(ta), _rows(tb), strict=True):
                self.bytes_read += 2 * ca.numel() * ca.element_size()
                if not torch.equal(_bits(ca), _bits(cb)):
                    return False
        return True

    def _constant_along(self, t: torch.Tensor, dims) -> bool:
        """``t`` repeats its first slice along ``dims`` (``t`` itself has no stride-0 dimension)."""
        if _overlapping(t):
            return False
        return self._chunks_equal(t, _narrowed(t, dims).expand(t.shape))

    # -- through a transpose (the transposed-copy pass) -------------------------------------
    def sample_transposed(self, name: str) -> bytes:
        got = self._prefetched.pop(("transposed", name), None)
        if got is not None:
            return got
        rng = self._file_range(name)
        if rng is not None:  # a small tensor whole, else one element per read (_sample_reads)
            raw = b"".join(self._pread(rng[0], n, off) for off, n in self._sample_reads(name, rng, True))
            return self._picked(name, raw, rng, True)
        t = self.tensors[name]
        rows, _cols = t.shape  # t.T has shape (cols, rows): flat index k of t.T is t[k % rows, k // rows]
        size = t.element_size()
        idx = sample_index(t.numel(), size, self.whole_sample_bytes)
        vals = t[torch.tensor([k % rows for k in idx]), torch.tensor([k // rows for k in idx])]
        self.bytes_read += len(idx) * size
        return _bits(vals.contiguous()).numpy().tobytes()

    def _columns(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Columns ``lo:hi`` of a 2-D tensor, contiguous: one pread per row for a mapped file
        (only those bytes are read), else a slice copy."""
        t = self.tensors[name]
        rng = self._file_range(name)
        if rng is None:
            block = t[:, lo:hi].contiguous()
            self.bytes_read += block.numel() * block.element_size()
            return block
        fd, start, _, _ = rng
        rows, cols = t.shape
        size = t.element_size()
        raw = bytearray()
        for r in range(rows):
            raw += self._pread(fd, (hi - lo) * size, start + (r * cols + lo) * size)
        return torch.frombuffer(raw, dtype=t.dtype).reshape(rows, hi - lo)

    def _row_block(self, name: str, lo: int, hi: int) -> torch.Tensor:
        t = self.tensors[name]
        rng = self._file_range(name)
        if rng is None:
            block = t[lo:hi].contiguous()
            self.bytes_read += block.numel() * block.element_size()
            return block
        fd, start, _, _ = rng
        cols, size = t.shape[1], t.element_size()
        raw = bytearray(self._pread(fd, (hi - lo) * cols * size, start + lo * cols * size))
        return torch.frombuffer(raw, dtype=t.dtype).reshape(hi - lo, cols)

    def equal_transposed(self, a: str, b: str) -> bool:
        """``a`` equals ``b.T``: ``a``'s rows block by block against the same columns of ``b``,
        at most ~CHUNK_BYTES from each side at a time. Views that repeat stored elements (stride 0,
        overlaps) are not compared: the blocks would walk every repetition."""
        ta, tb = self.tensors[a], self.tensors[b]
        if ta.dim() != 2 or tuple(tb.shape) != tuple(ta.shape)[::-1] or ta.dtype != tb.dtype:
            return False
        if any(_broadcast_dims(t) or _overlapping(t) for t in (ta, tb)):
            return False
        rows, cols = ta.shape
        step = max(1, CHUNK_BYTES // max(1, cols * ta.element_size()))
        with torch.no_grad():
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                if not torch.equal(_bits(self._row_block(a, lo, hi)), _bits(self._columns(b, lo, hi).t().contiguous())):
                    return False
        return True
