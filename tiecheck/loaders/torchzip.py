"""``torch.save`` zip archives read as records, without making a tensor per entry.

``torch.load(mmap=True, weights_only=True)`` makes every storage and tensor object while it
unpickles, in a pure-Python unpickler: at 100,000 tensors that alone takes about 20 s and
225 MiB over the torch import, before anything is analysed. The analyses need each tensor's
dtype, shape, strides, storage and offset, which the archive's ``data.pkl`` states outright.
So a zip written by ``torch.save`` is read here first: the C unpickler runs with every global
replaced by a record builder of this module (``find_class`` answers only the handful of names
``torch.save`` writes for tensors and containers; anything else is not taken here), and each
persistent storage id becomes a reference to its ``data/<key>`` record, checked against the
archive. Tensors are made on access, each a view into one read-only mapping of the file, the
storage sliced as ``torch.load(mmap=True)`` slices it, so a tensor made here is what
``torch.load`` would have returned.

Whatever this reader does not take (another global, a quantized or sparse tensor, a compressed
or big-endian archive, an entry that does not fit its storage) makes ``read_archive`` return
None, and the file goes through ``torch.load`` as before, with its messages and refusals.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from tiecheck.facts import TensorFact, span_elements
from tiecheck.loaders.fileview import FileSpan, map_file
from tiecheck.loaders.zipcheck import ZipArchive

# The legacy storage classes torch.save names for each dtype (torch.storage's own table, which
# torch says will not grow: newer dtypes are written as an UntypedStorage plus a dtype global).
LEGACY_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}
_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}  # rebuilt by _rebuild_qtensor: torch.load's


def _dtype_table() -> dict[str, tuple[str, int, bool]]:
    """name -> (canonical name, itemsize, floating or complex) of every dtype torch's namespace holds
    (read from its __dict__: a getattr could import one of torch's lazily loaded submodules for a
    name the file chose). Aliases (``float``, ``half``) map to their canonical names."""
    out = {}
    for name, dt in vars(torch).items():
        if isinstance(dt, torch.dtype) and name not in _QUANTIZED:
            out[name] = (str(dt).removeprefix("torch."), dt.itemsize, dt.is_floating_point or dt.is_complex)
    return out


DTYPES = _dtype_table()
MAX_PICKLE_BYTES = 1 << 30  # a data.pkl of 100,000 tensors is about 12 MB


class _NotTaken(Exception):
    """The archive holds something this reader leaves to torch.load."""


class _StorageType(NamedTuple):
    dtype: str | None  # None: an UntypedStorage, counted in bytes


class _DType(NamedTuple):
    name: str  # a torch dtype named by a _rebuild_tensor_v3 record


class _StorageRef(NamedTuple):
    key: str
    dtype: str | None
    numel: int  # elements of dtype (bytes for an UntypedStorage)


class TensorRecord(NamedTuple):
    """One tensor as ``data.pkl`` describes it."""

    key: str  # the storage record, ``data/<key>`` in the archive
    dtype: str
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool


def _ints(v: Any) -> bool:
    return type(v) is tuple and all(type(x) is int and x >= 0 for x in v)


class _StateDict(dict):
    """``collections.OrderedDict`` as unpickled here: a dict whose pickled attributes (a state
    dict's ``_metadata``, module versions) are dropped; only its items matter to the analysis."""

    def __setstate__(self, state: Any) -> None:
        pass


# What find_class answers: a container type, or the name of an unpickler method that builds a record.
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "rebuild_tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    **{("torch", name): _StorageType(dtype) for name, dtype in LEGACY_STORAGES.items()},
}


class _RecordUnpickler(pickle.Unpickler):
    """The C unpickler with every global answered by this class: nothing from the file is imported
    or called except the record builders below (``find_class`` is the only way a pickle reaches a
    global, for GLOBAL, STACK_GLOBAL, INST, OBJ and the extension registry alike)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _StorageRef] = {}
        self.records: list[TensorRecord] = []  # every tensor record built, for the bounds check

    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        if isinstance(found, str):
            return getattr(self, found)
        if found is not None:
            return found
        if module == "torch" and name in DTYPES:
            return _DType(DTYPES[name][0])
        raise _NotTaken(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage" or type(pid[1]) is not _StorageType or \
                type(pid[2]) is not str or type(pid[4]) is not int or pid[4] < 0:
            raise _NotTaken("a persistent id this reader does not take")
        ref = _StorageRef(pid[2], pid[1].dtype, pid[4])
        known = self.storages.setdefault(ref.key, ref)
        if known != ref:
            raise _NotTaken("one storage read as two dtypes")
        return known

    # -- the record builders, in place of torch._utils' rebuild functions --------------------
    def _record(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                dtype: str | None) -> TensorRecord:
        if type(storage) is not _StorageRef or type(offset) is not int or offset < 0 or not _ints(size) or \
                not _ints(stride) or len(size) != len(stride) or type(requires_grad) is not bool or dtype is None:
            raise _NotTaken("a tensor record this reader does not take")
        record = TensorRecord(storage.key, dtype, offset, size, stride, requires_grad)
        self.records.append(record)
        return record

    def rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad, hooks, metadata=None) -> TensorRecord:
        if hooks or metadata or type(storage) is not _StorageRef:
            raise _NotTaken("backward hooks, tensor metadata or a storage this reader does not take")
        return self._record(storage, offset, size, stride, requires_grad, storage.dtype)

    def rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype,
                          metadata=None) -> TensorRecord:
        if hooks or metadata or type(dtype) is not _DType or type(storage) is not _StorageRef or \
                storage.dtype is not None:
            raise _NotTaken("a typed tensor record this reader does not take")
        return self._record(storage, offset, size, stride, requires_grad, dtype.name)

    def rebuild_parameter(self, data, requires_grad, hooks) -> TensorRecord:
        if type(data) is not TensorRecord or type(requires_grad) is not bool or hooks:
            raise _NotTaken("a parameter record this reader does not take")
        return data._replace(requires_grad=requires_grad)


def _archive_records(path: str) -> tuple[bytes, dict[str, tuple[int, int]]] | None:
    """data.pkl and (file offset, size) of every stored ``data/<key>`` record, or None when the
    archive is not one this reader takes (compressed records, big-endian data, no data.pkl)."""
    with ZipArchive(path, path) as za:
        pickles = [n for n in za.infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            return None
        prefix = pickles[0][:-len("data.pkl")]
        if prefix + "byteorder" in za.infos and za.read(prefix + "byteorder", limit=16) != b"little":
            return None
        data = za.read(pickles[0], limit=MAX_PICKLE_BYTES)
        where = prefix + "data/"
        records = {}
        for name in za.infos:
            if name.startswith(where):
                span = za.span(name)
                if span is None:
                    return None  # compressed: torch.load copies it out
                records[name[len(where):]] = span
    return data, records


def read_archive(path: str) -> tuple[Any, ArchiveFile] | None:
    """The object a ``torch.save`` zip holds, with ``TensorRecord`` in place of each tensor, and the
    file that makes them tensors; None when the archive needs ``torch.load``.

    Raises:
        TargetError: the archive itself is damaged (from ``ZipArchive``).
    """
    got = _archive_records(path)
    if got is None:
        return None
    data, records = got
    unpickler = _RecordUnpickler(data)
    try:
        obj = unpickler.load()
    except Exception:  # noqa: BLE001 - nothing from the file ran; torch.load reads it and says what is wrong
        return None
    finally:
        # The memo holds every object the pickle put there, the builders (bound to the unpickler)
        # among them: a cycle the paused collector would not free.
        unpickler.memo.clear()
    del data
    storages = {}  # key -> (file offset, bytes the storage holds)
    for key, ref in unpickler.storages.items():
        span = records.get(key)
        if span is None:
            return None  # a storage with no record: torch.load says so
        nbytes = ref.numel * (1 if ref.dtype is None else _dtype_facts(ref.dtype)[0])
        if nbytes > span[1]:
            return None  # the record is shorter than its storage
        storages[key] = (span[0], nbytes)
    del records
    for r in unpickler.records:
        # Element offsets count in the tensor's dtype, whatever the storage's (v3 records).
        if r.offset + span_elements(r.shape, r.stride) > storages[r.key][1] // _dtype_facts(r.dtype)[0]:
            return None  # a tensor past its storage's end: torch.load refuses it in its own words
    return obj, ArchiveFile(path, storages)


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

    def tensors(self, records: Mapping[str, TensorRecord]) -> "ArchiveTensors":
        """The named records (each checked against its storage by ``read_archive``) as tensors."""
        return ArchiveTensors(self, records if type(records) is dict else dict(records))


def _dtype_facts(dtype: str) -> tuple[int, bool]:
    """(itemsize, floating or complex) of a canonical dtype name."""
    _, itemsize, floating = DTYPES[dtype]
    return itemsize, floating


class _RecordsView(Mapping):
    """A name -> value view over the named records of one archive; subclasses say what a value is."""

    def __init__(self, archive: ArchiveFile, records: dict[str, TensorRecord]):
        self._archive = archive
        self._records = records

    def __iter__(self):
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name: object) -> bool:
        return name in self._records


class ArchiveTensors(_RecordsView):
    """Name -> tensor for the records of one archive, each tensor made on access.

    ``facts()`` describes every tensor from its record, as ``tiecheck.facts.fact_of`` describes the
    tensor ``torch.load(mmap=True)`` makes: the storage key is the storage's address in the mapping.
    """

    def __getitem__(self, name: str) -> torch.Tensor:
        r = self._records[name]
        t = torch.empty(0, dtype=getattr(torch, r.dtype)).set_(self._archive.storage(r.key), r.offset, r.shape,
                                                               r.stride)
        return t.requires_grad_(True) if r.requires_grad else t

    def spans(self) -> Mapping[str, FileSpan]:
        """Where each tensor's storage starts in the file, for the content pass's preads (made on access)."""
        return _Spans(self._archive, self._records)

    def file_layout(self, name: str) -> tuple[int, int, int] | None:
        """(offset of the first element from the storage's start, nbytes, itemsize) of a contiguous
        tensor, for pread; None for a strided one (the content pass reads it through the tensor)."""
        r = self._records[name]
        itemsize, _ = _dtype_facts(r.dtype)
        numel, expect = 1, 1
        for n, st in zip(reversed(r.shape), reversed(r.stride)):
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
            itemsize, floating = _dtype_facts(r.dtype)
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
