"""Byte ranges of two files compared through two reused buffers: ``tiecheck fix``'s check of every
byte of its copy, and the content pass's full comparison of two tensors of local files."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait

# Bytes per read when comparing files. Two 4 MiB buffers stay in the CPU cache between the read
# that fills them and the memcmp that compares them; two of 16 MiB did not (measured: 0.45-0.50 s
# against 0.60-0.70 s for the same 1.75 GiB compared).
COMPARE_CHUNK = 4 << 20
# From this many bytes a read of the second file runs on a worker thread beside the first's: a read
# from the page cache is a copy that releases the GIL, so the two copies run on two cores. Below it
# the hand-over costs more than it saves. Measured on a quiet 2-core machine, 256 MiB of cached files
# compared in ranges of 4 MiB: 0.050 s on one thread, 0.039 s on two; of 1 MiB: 0.060 s, 0.064 s;
# of 256 KiB: 0.095 s, 0.12 s.
PARALLEL_FROM = COMPARE_CHUNK


class FileRangeCompare:
    """Byte ranges of two files compared through two reused buffers: ``tiecheck fix``'s check of
    every byte of its copy, and the content pass's full comparison of two tensors of local files.

    A ``pread`` into a fresh buffer per read costs a page fault per 4 KiB and dominated fix's
    verification (every byte of the copy against the input). ``os.preadv`` into the same two buffers, compared as buffers (memcmp),
    reads at the speed of the page cache and keeps memory at two chunks; from ``PARALLEL_FROM`` bytes a
    worker thread reads the second file's chunk while the caller reads the first's. A pair of ranges already
    found equal (a dropped name and the name it now shares point at the same bytes of both files)
    is not read again: the files do not change between the two comparisons, so neither would the
    answer. (Comparing mapped windows in place instead was measured slower: ``torch.equal`` over
    bytes runs element by element, several times slower than the buffers' memcmp.)
    """

    def __init__(self) -> None:
        self.bufs = (bytearray(COMPARE_CHUNK), bytearray(COMPARE_CHUNK))
        self.fds: dict[str, int] = {}
        self.bytes_read = 0
        self.same: set[tuple] = set()
        self._reader: ThreadPoolExecutor | None = None  # the second file's reads, from the first big range

    def _fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def equal(self, a: tuple[str, int], b: tuple[str, int], nbytes: int) -> bool:
        """``nbytes`` at (path, offset) ``a`` against those at ``b``; files opened once and kept."""
        key = (a, b, nbytes)
        if key in self.same:
            return True
        same = self.equal_fds(self._fd(a[0]), a[1], self._fd(b[0]), b[1], nbytes)
        if same:
            self.same.add(key)
        return same

    def equal_fds(self, fa: int, offset_a: int, fb: int, offset_b: int, nbytes: int) -> bool:
        """``nbytes`` at ``offset_a`` of open file ``fa`` against those at ``offset_b`` of ``fb``."""
        for off in range(0, nbytes, COMPARE_CHUNK):
            n = min(COMPARE_CHUNK, nbytes - off)
            views = [memoryview(buf)[:n] for buf in self.bufs]
            if n >= PARALLEL_FROM:
                if self._reader is None:
                    self._reader = ThreadPoolExecutor(1, thread_name_prefix="tiecheck-compare")
                read_b = self._reader.submit(os.preadv, fb, [views[1]], offset_b + off)
                try:
                    got_a = os.preadv(fa, [views[0]], offset_a + off)
                finally:
                    wait([read_b])  # the worker is done with the buffer before anything else touches it
                got = got_a, read_b.result()
            else:
                got = os.preadv(fa, [views[0]], offset_a + off), os.preadv(fb, [views[1]], offset_b + off)
            if got != (n, n):
                raise OSError("short read: a file changed while it was compared")
            self.bytes_read += 2 * n
            # A whole chunk compares the buffers themselves (memcmp); a tail compares copies of its bytes.
            same = self.bufs[0] == self.bufs[1] if n == COMPARE_CHUNK else bytes(views[0]) == bytes(views[1])
            if not same:
                return False
        return True

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self._reader is not None:
            self._reader.shutdown()
            self._reader = None
