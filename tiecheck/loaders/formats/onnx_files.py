"""ONNX models (``.onnx``, with or without external data files), read without running anything.

The protobuf is parsed with the ``onnx`` package (``onnx.load(..., load_external_data=False)``)
after its size is checked against protobuf's own 2 GiB limit; external data is never loaded
through ``onnx``: each external file is memory-mapped once and every initializer stored there
becomes a view at its ``offset``, with a file span so the content pass reads it with pread.
Locations are judged by name before anything is opened: an absolute path or one with ``..``
is refused, as the ONNX specification requires external data to sit beside the model.

Ties in an ONNX graph are uses, not names: one initializer read by the embedding's ``Gather``
and by the head's ``MatMul``/``Gemm`` (possibly through a ``Transpose``) is a tie the export
kept. That head use is added to the subject as an alias named ``<node>:B`` (a transposed view
when a Transpose sits between), so it shows as a tie group like any other. A head that reads a
separate initializer holding the embedding's transpose (what the TorchScript exporter's
constant folding writes) is a tie the export lost; it is found here, from the graph, by
comparing the two initializers block by block.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from tiecheck.errors import TargetError
from tiecheck.facts import Source, TensorFact, span_elements
from tiecheck.loaders.content import HeldBytes
from tiecheck.loaders.fileview import FileSpan, RecordsMapping, map_file
from tiecheck.loaders.onnx_graph import embedding_heads
from tiecheck.loaders.subject import Subject

MAX_PROTO = (2 << 30) - 1  # protobuf refuses messages of 2 GiB and more; larger models use external data
MAX_BYTES = (1 << 63) - 1

# TensorProto.DataType -> torch dtype name.
DTYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32", TensorProto.UINT8: "uint8", TensorProto.INT8: "int8",
    TensorProto.UINT16: "uint16", TensorProto.INT16: "int16", TensorProto.INT32: "int32",
    TensorProto.INT64: "int64", TensorProto.BOOL: "bool", TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64", TensorProto.UINT32: "uint32", TensorProto.UINT64: "uint64",
    TensorProto.COMPLEX64: "complex64", TensorProto.COMPLEX128: "complex128", TensorProto.BFLOAT16: "bfloat16",
    TensorProto.FLOAT8E4M3FN: "float8_e4m3fn", TensorProto.FLOAT8E4M3FNUZ: "float8_e4m3fnuz",
    TensorProto.FLOAT8E5M2: "float8_e5m2", TensorProto.FLOAT8E5M2FNUZ: "float8_e5m2fnuz",
}

FLOPS_REASON = ("FLOPs are counted for PyTorch modules only; an ONNX graph is not traced (inspect the PyTorch "
                "model, a Python spec or a Hugging Face folder for FLOPs)")


def _bad(path: Path, why: str) -> TargetError:
    return TargetError(f"{path}: not a valid ONNX model: {why}")


def read_model(path: Path) -> onnx.ModelProto:
    """The ModelProto, without external data; refuses files protobuf could not hold."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e.strerror or e})") from e
    if size > MAX_PROTO:
        raise _bad(path, f"{size:,} bytes exceeds protobuf's 2 GiB limit; models this large keep their weights "
                         f"in external data files")
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, TypeError) as e:
        text = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise _bad(path, f"the protobuf cannot be parsed ({text}): the file is truncated or corrupt") from e
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e.strerror or e})") from e
    if not model.HasField("graph"):
        raise _bad(path, "the model holds no graph")
    return model


def _numel(path: Path, name: str, dims: list[int], itemsize: int) -> int:
    if any(d < 0 for d in dims):
        raise _bad(path, f"initializer {name!r} has dims {dims}: negative sizes")
    n = 1
    for d in dims:
        n *= d if d else 1
        if n * itemsize > MAX_BYTES:
            raise _bad(path, f"initializer {name!r} has dims {dims}: more bytes than any file can hold")
    return 0 if 0 in dims else n


def external_location(path: Path, name: str, location: str) -> Path:
    """The external data file of an initializer, refusing any location outside the model's folder."""
    loc = Path(location)
    if not location or loc.is_absolute() or ".." in loc.parts or "\\" in location or "\x00" in location:
        raise TargetError(f"{path}: initializer {name!r} names external data {location!r}, which lies outside the "
                          f"model's folder; refusing to read it (external data must sit beside the model)")
    return path.parent / loc


class _Record(NamedTuple):
    """Where one initializer's elements are: an external file's mapping, or the inline buffer."""

    storage: int  # index in OnnxTensors' storages; INLINE: the inline buffer; EMPTY: no elements
    offset: int  # elements from the storage's start (inline: bytes from the buffer's start)
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


INLINE, EMPTY = -1, -2


_LAYOUTS: dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}


def _layout(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, contiguous strides), one shared pair per distinct shape: models repeat a few shapes."""
    known = _LAYOUTS.get(shape)
    if known is None:
        stride, acc = [], 1
        for n in reversed(shape):
            stride.append(acc)
            acc *= max(n, 1)
        known = (shape, tuple(reversed(stride)))
        if len(_LAYOUTS) < 65536:
            _LAYOUTS[shape] = known
    return known


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    return _layout(shape)[1]


class OnnxTensors(RecordsMapping):
    """name -> tensor for an ONNX model's initializers (and head aliases), each made on access: a view
    of its external file's one mapping, or, for data stored in the protobuf, its own slice of one
    buffer holding all of it (as if each had its own storage). ``facts()`` describes them from their
    records: 200,000 initializers cost a record each, not a tensor each."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._storages: list[torch.UntypedStorage] = []
        self._inline = bytearray()
        self._inline_storage: torch.UntypedStorage | None = None

    def add_storage(self, storage: torch.UntypedStorage) -> int:
        self._storages.append(storage)
        return len(self._storages) - 1

    def add_external(self, name: str, storage: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self._records[name] = _Record(storage, offset, dtype, *_layout(shape))

    def add_inline(self, name: str, data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if not data:
            self._records[name] = _Record(EMPTY, 0, dtype, *_layout(shape))
            return
        self._inline += bytes(-len(self._inline) % 16)  # every inline tensor starts aligned
        self._records[name] = _Record(INLINE, len(self._inline), dtype, *_layout(shape))
        self._inline += data

    def add_alias(self, alias: str, name: str, transposed: bool) -> None:
        r = self._records[name]
        self._records[alias] = r._replace(shape=r.shape[::-1], stride=r.stride[::-1]) if transposed else r

    def _storage(self, r: _Record) -> tuple[torch.UntypedStorage, int]:
        """(storage, element offset) of a record; an inline record gets its own slice of the buffer."""
        if r.storage != INLINE:
            return self._storages[r.storage], r.offset
        if self._inline_storage is None:
            self._inline_storage = torch.frombuffer(self._inline, dtype=torch.uint8).untyped_storage()
        nbytes = math.prod(r.shape) * r.dtype.itemsize
        return self._inline_storage[r.offset:r.offset + nbytes], 0

    def __getitem__(self, name: str) -> torch.Tensor:
        r = self._records[name]
        if r.storage == EMPTY:
            return torch.empty(r.shape, dtype=r.dtype)
        storage, offset = self._storage(r)
        return torch.empty(0, dtype=r.dtype).set_(storage, offset, r.shape, r.stride)

    def file_layout(self, name: str) -> tuple[int, int, int] | None:
        """(offset of the first element from the storage's start, nbytes, itemsize) of a contiguous
        tensor in an external file, for pread; None otherwise."""
        r = self._records[name]
        if r.storage < 0 or r.stride != _contiguous(r.shape):
            return None
        size = r.dtype.itemsize
        return r.offset * size, math.prod(r.shape) * size, size

    def memory_layout(self, name: str) -> HeldBytes | None:
        """Where the bytes of a contiguous tensor stored in the protobuf are, so the content pass can
        slice them without making a tensor; None otherwise."""
        r = self._records[name]
        if r.storage != INLINE or r.stride != _contiguous(r.shape):
            return None
        size = r.dtype.itemsize
        return HeldBytes(self._inline, r.offset, math.prod(r.shape) * size, size, (r.dtype, r.shape))

    def facts(self) -> list[TensorFact]:
        """A TensorFact per name, as ``fact_of`` describes the tensor made on access."""
        if self._inline and self._inline_storage is None:
            self._inline_storage = torch.frombuffer(self._inline, dtype=torch.uint8).untyped_storage()
        out = []
        for name, r in self._records.items():
            size = r.dtype.itemsize
            storage, start, end, nbytes = None, 0, 0, 0
            if r.storage != EMPTY:
                if r.storage == INLINE:
                    nbytes = math.prod(r.shape) * size
                    storage = ("cpu", self._inline_storage.data_ptr() + r.offset)
                else:
                    st = self._storages[r.storage]
                    storage, nbytes, start = ("cpu", st.data_ptr()), st.nbytes(), r.offset * size
                end = start + span_elements(r.shape, r.stride) * size
            out.append(TensorFact(name=name, shape=r.shape, stride=r.stride, dtype=str(r.dtype).removeprefix("torch."),
                                  itemsize=size, device="cpu", storage=storage, byte_start=start, byte_end=end,
                                  owner=name.rsplit(".", 1)[0] if "." in name else "", requires_grad=False,
                                  is_floating=r.dtype.is_floating_point or r.dtype.is_complex,
                                  storage_bytes=nbytes))
        return out


@dataclass
class _Files:
    """One read-only mapping per external data file."""

    tensors: OnnxTensors
    storages: dict[Path, tuple[int, int]] = field(default_factory=dict)  # path -> (storage index, size)

    def storage(self, p: Path, model: Path, name: str) -> tuple[int, int] | None:
        if p not in self.storages:
            try:
                size = p.stat().st_size
            except OSError as e:
                raise TargetError(f"{model}: external data {p.name} of initializer {name!r} cannot be read "
                                  f"({e.strerror or e}); copy it next to the model") from e
            if not size:
                self.storages[p] = (EMPTY, 0)
            else:
                st = map_file(p, size, f"{model}: external data of initializer {name!r}")
                self.storages[p] = (self.tensors.add_storage(st), size)
        return self.storages[p]


def _initializer(path: Path, t: TensorProto, files: _Files, spans: dict, notes: list[str]) -> bool:
    """Record one initializer in ``files.tensors``: a view of its external file where it has one, else
    its bytes in the inline buffer. False for a type tiecheck does not read."""
    dname = DTYPES.get(t.data_type)
    dtype = getattr(torch, dname, None) if dname else None
    if dtype is None:
        return False
    tensors = files.tensors
    itemsize = dtype.itemsize
    dims = tuple(int(d) for d in t.dims)
    numel = _numel(path, t.name, list(dims), itemsize)
    nbytes = numel * itemsize
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        p = external_location(path, t.name, info.get("location", ""))
        try:
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") else nbytes
        except ValueError as e:
            raise _bad(path, f"initializer {t.name!r} has a malformed external data offset or length") from e
        if offset < 0 or length != nbytes:
            raise _bad(path, f"initializer {t.name!r} ({dname} {list(dims)}) needs {nbytes:,} bytes but its external "
                             f"data says offset {offset:,}, length {length:,}")
        index, size = files.storage(p, path, t.name)
        if offset + length > size:
            raise TargetError(f"{path}: initializer {t.name!r} needs bytes {offset:,}..{offset + length:,} of "
                              f"{p.name}, which holds {size:,}: the data file is truncated; copy it again")
        if nbytes == 0:
            tensors.add_inline(t.name, b"", dtype, dims)
        elif offset % itemsize == 0:
            spans[t.name] = FileSpan(os.fspath(p), 0)
            tensors.add_external(t.name, index, offset // itemsize, dtype, dims)
        else:
            notes.append(f"{t.name}: external data at an unaligned offset, copied into memory")
            with open(p, "rb") as fh:
                tensors.add_inline(t.name, os.pread(fh.fileno(), nbytes, offset), dtype, dims)
        return True
    if t.HasField("raw_data"):
        raw = t.raw_data
        if len(raw) != nbytes:
            raise _bad(path, f"initializer {t.name!r} ({dname} {list(dims)}) needs {nbytes:,} bytes but holds "
                             f"{len(raw):,}")
        tensors.add_inline(t.name, raw, dtype, dims)
        return True
    try:
        arr = numpy_helper.to_array(t)
    except (ValueError, TypeError, RuntimeError) as e:
        raise _bad(path, f"initializer {t.name!r} cannot be read ({str(e)[:120]})") from e
    data = np.ascontiguousarray(arr).tobytes()
    if len(data) != nbytes:
        raise _bad(path, f"initializer {t.name!r} ({dname} {list(dims)}) needs {nbytes:,} bytes but holds "
                         f"{len(data):,}")
    tensors.add_inline(t.name, data, dtype, dims)
    return True


def load_onnx(path: Path) -> Subject:
    """An ONNX model's initializers as tensors, with the embedding/head ties its graph shows."""
    model = read_model(path)
    graph = model.graph
    tensors = OnnxTensors()
    files = _Files(tensors)
    spans: dict[str, FileSpan] = {}
    notes: list[str] = []
    skipped: list[str] = []
    external = 0
    for t in graph.initializer:
        if t.name in tensors or not t.name:
            raise _bad(path, f"initializer name {t.name!r} is empty or used twice")
        if not _initializer(path, t, files, spans, notes):
            skipped.append(t.name)
            continue
        external += t.data_location == TensorProto.EXTERNAL
    if skipped:
        notes.append(f"skipped {len(skipped)} initializer(s) of types tiecheck does not read (e.g. {skipped[0]})")
    if len(graph.sparse_initializer):
        notes.append(f"skipped {len(graph.sparse_initializer)} sparse initializer(s)")
    if not tensors:
        raise TargetError(f"{path}: the ONNX graph holds no initializers (no weights to analyse)")
    pairs, found, aliases = embedding_heads(tensors, spans, graph, notes)
    data_files = sorted(p.name for p in files.storages)
    total = sum(size for _, size in files.storages.values())
    opsets = {o.domain or "ai.onnx": int(o.version) for o in model.opset_import}
    notes.insert(0, f"{len(graph.initializer)} initializers ({external} in external data"
                    f"{' ' + ', '.join(data_files) if data_files else ''}); graph of {len(graph.node)} nodes, "
                    f"opset {opsets.get('ai.onnx', '?')}, produced by {model.producer_name or 'unknown'} "
                    f"{model.producer_version}".rstrip())
    if not pairs:
        notes.append("no initializer is read both by a Gather (embedding) and a MatMul/Gemm (head)")
    extra = {"onnx": {"ir_version": int(model.ir_version), "opsets": opsets, "producer": model.producer_name,
                      "producer_version": model.producer_version, "nodes": len(graph.node),
                      "initializers": len(graph.initializer), "external_files": data_files,
                      "external_bytes": total, "embedding_head": pairs,
                      "aliases": sorted(aliases), "file_bytes": path.stat().st_size},
             "flops_unavailable": FLOPS_REASON}
    return Subject(tensors=tensors, source=Source(target=str(path), format="ONNX", notes=notes),
                   loader_findings=found, extra=extra, file_spans=spans)
