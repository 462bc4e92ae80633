"""The tensors of a ``torch.save`` zip read as records (``torchzip``): each made on access.

``torchzip.read_archive`` turns ``data.pkl`` into ``TensorRecord``s checked against their storage
records; this module makes them tensors, each a view into one read-only mapping of the file with
the storage sliced as ``torch.load(mmap=True)`` slices it, and describes them without making any
(``facts()``, ``spans()``, ``file_layout()``) for the analyses and the content pass.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from functools import cache
from typing import NamedTuple

import torch

from tiecheck.facts import TensorFact, span_elements
from tiecheck.loaders.fileview import FileSpan, RecordsMapping, map_file


class TensorRecord(NamedTuple):
    """One tensor as ``data.pkl`` describes it."""

    key: str  # the storage record, ``data/<key>`` in the archive
    dtype: str
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool


@cache
def dtype_facts(dtype: str) -> tuple[int, bool]:
    """(itemsize, floating or complex) of a canonical dtype name (one the record builder accepted)."""
    dt = vars(torch)[dtype]  # not getattr: a name never imports one of torch's lazy submodules
    return dt.itemsize, dt.is_floating_point or dt.is_complex


class ArchiveFile:
    """One mapping of the archive, and the storage records' places in it."""

    def __init__(self, path: str, storages: dict[str, tuple[int, int]]):
        self.path = path
        self.storages = storages  # key -> (file offset of the record, bytes the storage holds)
        self._mapping: torch.UntypedStorage | None = None
        self._views: dict[str, torch.UntypedStorage] = {}

    @property
    def mapping(self) -> torch.UntypedStorage:
        if self._mapping is None:
            self._mapping = map_file(self.path, os.path.getsize(self.path), self.path)
        return self._mapping

    def storage(self, key: str) -> torch.UntypedStorage:
        """The storage ``torch.load(mmap=True)`` would make for ``key``: a slice of the mapping."""
        st = self._views.get(key)
        if st is None:
            off, nbytes = self.storages[key]
            st = self._views[key] = self.mapping[off:off + nbytes]
        return st

    def tensors(self, records: Mapping[str, TensorRecord]) -> ArchiveTensors:
        """The named records (each checked against its storage by ``read_archive``) as tensors."""
        return ArchiveTensors(self, records if type(records) is dict else dict(records))


_EXPERIMENTAL = {torch.complex32}  # dtypes whose tensors torch warns about when they are made


class _RecordsView(RecordsMapping):
    """A name -> value view over the named records of one archive; subclasses say what a value is."""

    def __init__(self, archive: ArchiveFile, records: dict[str, TensorRecord]):
        self._archive = archive
        self._records = records


class ArchiveTensors(_RecordsView):
    """Name -> tensor for the records of one archive, each tensor made on access.

    ``facts()`` describes every tensor from its record, as ``tiecheck.loaders.tensor_facts.fact_of`` describes the
    tensor ``torch.load(mmap=True)`` makes: the storage key is the storage's address in the mapping.
    """

    def __getitem__(self, name: str) -> torch.Tensor:
        r = self._records[name]
        dtype = getattr(torch, r.dtype)
        if dtype in _EXPERIMENTAL:  # warned while loading (a note of the report); never again on stderr
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = torch.empty(0, dtype=dtype)
        else:
            t = torch.empty(0, dtype=dtype)
        t = t.set_(self._archive.storage(r.key), r.offset, r.shape, r.stride)
        return t.requires_grad_(True) if r.requires_grad else t

    def spans(self) -> Mapping[str, FileSpan]:
        """Where each tensor's storage starts in the file, for the content pass's preads (made on access)."""
        return _Spans(self._archive, self._records)

    def file_layout(self, name: str) -> tuple[int, int, int] | None:
        """(offset of the first element from the storage's start, nbytes, itemsize) of a contiguous
        tensor, for pread; None for a strided one (the content pass reads it through the tensor)."""
        r = self._records[name]
        itemsize, _ = dtype_facts(r.dtype)
        numel, expect = 1, 1
        for n, st in zip(reversed(r.shape), reversed(r.stride), strict=True):
            if n != 1 and st != expect:
                return None
            expect *= n
            numel *= n
        return r.offset * itemsize, numel * itemsize, itemsize

    def facts(self) -> list[TensorFact]:
        """A TensorFact per tensor, from the records (no tensor is made)."""
        base = self._archive.mapping.data_ptr()
        storages: dict[str, tuple[str, int]] = {}
        out = []
        for name, r in self._records.items():
            itemsize, floating = dtype_facts(r.dtype)
            key = storages.get(r.key)
            if key is None:
                key = storages[r.key] = ("cpu", base + self._archive.storages[r.key][0])
            start = r.offset * itemsize
            out.append(TensorFact(name=name, shape=r.shape, stride=r.stride, dtype=r.dtype, itemsize=itemsize,
                                  device="cpu", storage=key, byte_start=start,
                                  byte_end=start + span_elements(r.shape, r.stride) * itemsize,
                                  owner=name.rsplit(".", 1)[0] if "." in name else "", requires_grad=r.requires_grad,
                                  is_floating=floating, storage_bytes=self._archive.storages[r.key][1]))
        return out


class _Spans(_RecordsView):
    """name -> FileSpan of its storage, made on access: one object per name would cost 15 MB at
    100,000 tensors for what the content pass reads one name at a time."""

    def __getitem__(self, name: str) -> FileSpan:
        return FileSpan(self._archive.path, self._archive.storages[self._records[name].key][0])
