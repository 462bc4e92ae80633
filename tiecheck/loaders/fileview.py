"""Where a memory-mapped tensor's bytes sit in its file, so they can be read with pread.

Touching a memory-mapped tensor maps whole page-cache folios into the process (often a
megabyte or more per touch on current kernels), so sampling a few elements of every tensor
through the mapping can make most of a checkpoint resident. Reading the same bytes with
``os.pread`` copies only what was asked for. This module finds each tensor's file offset from
the process's own memory map (Linux ``/proc/self/maps``); where that is not available the
content pass reads through the mapping instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tiecheck.errors import TargetError


class RecordsMapping(Mapping):
    """A name -> tensor mapping over a loader's records (``self._records``, a dict by name), each tensor
    made on access by the subclass's ``__getitem__``."""

    _records: dict

    def __iter__(self):
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name: object) -> bool:
        return name in self._records


@dataclass(frozen=True, slots=True)
class FileSpan:
    path: str
    offset: int  # file offset of the tensor's storage byte 0


def _mappings_of(path: str) -> list[tuple[int, int, int]]:
    """(start, end, file_offset) of every mapping of ``path`` in this process."""
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        addr, _perms, offset, _dev, inode = parts[:5]
        if int(inode) != st.st_ino or os.path.realpath(parts[5].strip()) != os.path.realpath(path):
            continue
        start, end = (int(x, 16) for x in addr.split("-"))
        out.append((start, end, int(offset, 16)))
    return out


def file_spans(tensors: Mapping, path: str) -> dict[str, FileSpan]:
    """File offsets of the storages of memory-mapped tensors, by name."""
    maps = _mappings_of(path)
    if not maps:
        return {}
    out = {}
    for name, t in tensors.items():
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        for start, end, off in maps:
            if start <= ptr < end:
                out[name] = FileSpan(path, ptr - start + off)
                break
    return out


def map_file(path: str | os.PathLike, size: int, what: str) -> torch.UntypedStorage:
    """A read-only mapping of ``size`` bytes of the regular file at ``path``.

    Args:
        path: the file to map.
        size: how many bytes to map (the file's size, as the caller checked it).
        what: how the error names the file (e.g. ``"model.onnx: external data x.bin"``).

    Raises:
        TargetError: ``path`` is not a regular file (a folder, a device) or cannot be mapped,
            instead of torch's RuntimeError.
    """
    if not os.path.isfile(path):
        raise TargetError(f"{what}: {os.fspath(path)} is not a regular file")
    try:
        return torch.UntypedStorage.from_file(os.fspath(path), False, size)
    except (RuntimeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TargetError(f"{what}: cannot memory-map {os.fspath(path)} ({first})") from e
