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

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from tiecheck.errors import TargetError
from tiecheck.facts import Source, TensorFact, span_elements
from tiecheck.findings import finding
from tiecheck.loaders.content import HeldBytes
from tiecheck.loaders.fileview import FileSpan, RecordsMapping, map_file
from tiecheck.loaders.subject import Subject

MAX_PROTO = (2 << 30) - 1  # protobuf refuses messages of 2 GiB and more; larger models use external data
MAX_BYTES = (1 << 63) - 1
BLOCK_BYTES = 16 << 20  # bounded reads when comparing two initializers
MAX_LISTED = 16  # nodes named per note and pair; the rest are counted
MAX_PAIRS = 1024  # embedding/head pairs listed in the report

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
        self.paths: dict[int, str] = {}  # storage index -> the external file it maps

    def add_storage(self, storage: torch.UntypedStorage, path: str) -> int:
        self._storages.append(storage)
        self.paths[len(self._storages) - 1] = path
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
                self.storages[p] = (self.tensors.add_storage(st, os.fspath(p)), size)
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


# -- the graph: which nodes read each initializer ---------------------------------------------

@dataclass(frozen=True)
class Use:
    node: str  # node name (or op type and index when unnamed)
    op: str
    via: tuple[str, ...]  # Transpose/Identity nodes between the initializer and the node
    transposes: int  # Transposes on the way (a Gemm's transB counts)


def _node_name(node, i: int) -> str:
    return node.name or f"{node.op_type}#{i}"


def graph_uses(graph, inits: set[str]) -> tuple[dict[str, list[Use]], dict[str, list[Use]]]:
    """Embedding uses (Gather data input) and head uses (MatMul/Gemm B input) of each initializer."""
    producer: dict[str, tuple[Any, int]] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            producer.setdefault(out, (node, i))

    def source(value: str) -> tuple[str | None, tuple[str, ...], int]:
        via: list[str] = []
        transposes = 0
        for _ in range(8):  # a short chain of Identity/Transpose, never a cycle
            if value in inits:
                return value, tuple(via), transposes
            node, i = producer.get(value, (None, 0))
            if node is None or node.op_type not in ("Transpose", "Identity") or not node.input:
                return None, (), 0
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
                if perm != [1, 0]:
                    return None, (), 0
                transposes += 1
            via.append(f"{node.op_type} {_node_name(node, i)}")
            value = node.input[0]
        return None, (), 0

    embeddings: dict[str, list[Use]] = {}
    heads: dict[str, list[Use]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "Gather" and node.input:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            init, via, tr = source(node.input[0])
            if init is not None and axis == 0 and tr == 0:
                embeddings.setdefault(init, []).append(Use(_node_name(node, i), "Gather", via, 0))
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            init, via, tr = source(node.input[1])
            if init is None:
                continue
            if node.op_type == "Gemm":
                tr += next((a.i for a in node.attribute if a.name == "transB"), 0)
            heads.setdefault(init, []).append(Use(_node_name(node, i), node.op_type, via, tr))
    return embeddings, heads


# -- comparing two initializers in bounded blocks ---------------------------------------------

class _Reader:
    """Rows and column blocks of 2-D initializers: pread from their file when mapped, else from memory."""

    def __init__(self, tensors: dict[str, torch.Tensor], spans: dict[str, FileSpan]):
        self.tensors, self.spans = tensors, spans
        self.fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def _np(self, t: torch.Tensor, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.dtype(f"u{t.element_size()}") if t.element_size() in (1, 2, 4, 8)
                             else np.uint8)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        t = self.tensors[name]
        cols = t.shape[1]
        span = self.spans.get(name)
        if span is None:
            return _bits(t[start:stop]).reshape(stop - start, cols)
        size = t.element_size()
        if span.path not in self.fds:
            self.fds[span.path] = os.open(span.path, os.O_RDONLY)
        fd = self.fds[span.path]
        off = span.offset + (t.storage_offset() + start * cols) * size
        want = (stop - start) * cols * size
        data = os.pread(fd, want, off)
        if len(data) != want:
            raise TargetError(f"{span.path}: short read: the file changed or is truncated")
        return self._np(t, data).reshape(stop - start, cols)

    def columns(self, name: str, start: int, stop: int) -> np.ndarray:
        """Columns [start, stop) of every row, as a (rows, stop - start) array."""
        t = self.tensors[name]
        if self.spans.get(name) is None:
            return _bits(t[:, start:stop])
        span, size, cols = self.spans[name], t.element_size(), t.shape[1]
        if span.path not in self.fds:
            self.fds[span.path] = os.open(span.path, os.O_RDONLY)
        fd, base, want = self.fds[span.path], span.offset + t.storage_offset() * size, (stop - start) * size
        parts = []
        for r in range(t.shape[0]):  # one short read per row: only the block's columns
            data = os.pread(fd, want, base + (r * cols + start) * size)
            if len(data) != want:
                raise TargetError(f"{span.path}: short read: the file changed or is truncated")
            parts.append(data)
        return self._np(t, b"".join(parts)).reshape(t.shape[0], stop - start)


def _bits(t: torch.Tensor) -> np.ndarray:
    size = t.element_size()
    raw = t.contiguous().view(torch.uint8).numpy()
    return raw.view(np.dtype(f"u{size}")) if size in (1, 2, 4, 8) else raw


def transposed_equal(reader: _Reader, a: str, b: str) -> bool:
    """True when initializer ``b`` holds exactly the bytes of ``a``'s transpose (both 2-D).

    Rows of ``a`` are read a block at a time and compared with the matching columns of ``b``,
    so memory stays within a few blocks whatever the tensors' size.
    """
    ta, tb = reader.tensors[a], reader.tensors[b]
    if ta.dim() != 2 or tuple(tb.shape) != tuple(ta.shape)[::-1] or ta.dtype != tb.dtype:
        return False
    rows, cols = ta.shape
    if rows == 0 or cols == 0:
        return True
    step = max(1, BLOCK_BYTES // max(1, cols * ta.element_size()))
    # A cheap first look: row 0 of a against column 0 of b rules out unrelated tensors.
    if not np.array_equal(reader.rows(a, 0, 1)[0], reader.columns(b, 0, 1)[:, 0]):
        return False
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if not np.array_equal(reader.rows(a, start, stop), reader.columns(b, start, stop).T):
            return False
    return True


def plain_equal(reader: _Reader, a: str, b: str) -> bool:
    ta, tb = reader.tensors[a], reader.tensors[b]
    if ta.dim() != 2 or ta.shape != tb.shape or ta.dtype != tb.dtype:
        return False
    rows, cols = ta.shape
    step = max(1, BLOCK_BYTES // max(1, cols * ta.element_size()))
    return all(np.array_equal(reader.rows(a, s, min(rows, s + step)), reader.rows(b, s, min(rows, s + step)))
               for s in range(0, rows, step))


def _describe(use: Use) -> str:
    via = f" through {', '.join(use.via)}" if use.via else ""
    return f"{use.op} {use.node}{via}"


def _listed(items: list[str], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` items, and how many more: a graph may have thousands of readers."""
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more:,} more" if more > 0 else "")


def _digest(reader: _Reader, name: str, transposed: bool) -> bytes:
    """SHA-256 of a 2-D initializer's bytes in row order, or of its transpose's, read in blocks."""
    t = reader.tensors[name]
    rows, cols = t.shape
    h = hashlib.sha256()
    if transposed:
        step = max(1, BLOCK_BYTES // max(1, rows * t.element_size()))
        for start in range(0, cols, step):
            h.update(np.ascontiguousarray(reader.columns(name, start, min(cols, start + step)).T).tobytes())
    else:
        step = max(1, BLOCK_BYTES // max(1, cols * t.element_size()))
        for start in range(0, rows, step):
            h.update(reader.rows(name, start, min(rows, start + step)).tobytes())
    return h.digest()


def _copies(reader: _Reader, embeddings: list[str], heads: dict[str, list[Use]]) -> dict[str, tuple[str, str]]:
    """head initializer -> (the first embedding it holds a copy of, "transposed copy" or "copy").

    Pairs are never tried all against all: each initializer's bytes (and each embedding's
    transpose) are hashed once, heads are matched to embeddings by hash and shape, and each match
    is then confirmed byte for byte, so the work is one pass over each initializer whatever the
    number of Gather and MatMul nodes.
    """
    tensors = reader.tensors
    wanted_t, wanted = {}, {}  # (dtype, shape) -> heads that could hold a transpose / a plain copy
    for head, uses in heads.items():
        h = tensors[head]
        if h.dim() == 2:
            key = (h.dtype, tuple(h.shape))
            wanted_t.setdefault(key, []).append(head)
            if any(u.transposes % 2 for u in uses):
                wanted.setdefault(key, []).append(head)
    by_digest: dict[tuple, list[str]] = {}  # (relation, dtype, shape, digest) -> embeddings, in graph order
    for emb in embeddings:
        e = tensors[emb]
        key_t, key = (e.dtype, tuple(e.shape)[::-1]), (e.dtype, tuple(e.shape))
        if key_t in wanted_t:
            by_digest.setdefault(("transposed copy", *key_t, _digest(reader, emb, True)), []).append(emb)
        if key in wanted:
            by_digest.setdefault(("copy", *key, _digest(reader, emb, False)), []).append(emb)
    out: dict[str, tuple[str, str]] = {}
    for relation, table in (("transposed copy", wanted_t), ("copy", wanted)):
        for key, candidates in table.items():
            for head in candidates:
                if head in out:
                    continue
                same = by_digest.get((relation, *key, _digest(reader, head, False)), [])
                emb = next((x for x in same if x != head), None)  # a head reading the embedding itself is a tie
                check = transposed_equal if relation == "transposed copy" else plain_equal
                if emb is not None and check(reader, emb, head):
                    out[head] = (emb, relation)
    return out


def embedding_heads(tensors: OnnxTensors, spans: dict[str, FileSpan], graph,
                    notes: list[str]) -> tuple[list[dict], list[Any], list[str]]:
    """How each embedding (Gather) initializer relates to each head (MatMul/Gemm) initializer.

    Returns the pairs (for the report, one per head use, at most ``MAX_PAIRS``), loader findings
    (one per embedding and head initializer), and the names of the aliases added to ``tensors``
    for heads that read the embedding's own initializer.
    """
    embeddings, heads = graph_uses(graph, set(tensors))
    embeddings = {e: g for e, g in embeddings.items() if tensors[e].dim() == 2}
    pairs: list[dict] = []
    found: list[Any] = []
    aliases: list[str] = []
    reader = _Reader(tensors, spans)
    try:
        copies = _copies(reader, list(embeddings), heads)
    finally:
        reader.close()

    def pair(emb: str, head: str, use: Use, relation: str, nbytes: int, alias: str | None = None) -> None:
        if len(pairs) >= MAX_PAIRS:
            return
        e = tensors[emb]
        gathers = embeddings[emb]
        pairs.append({"embedding": emb, "embedding_nodes": [g.node for g in gathers[:MAX_LISTED]],
                      "head": head, "head_node": use.node, "head_op": use.op, "via": list(use.via),
                      "shape": list(e.shape), "dtype": str(e.dtype).replace("torch.", ""), "relation": relation,
                      **({"alias": alias} if alias else {}), "bytes_copied": nbytes})

    for emb, gathers in embeddings.items():
        e = tensors[emb]
        gather_text = _listed([_describe(g) for g in gathers])
        uses = heads.get(emb, [])
        for use in uses:  # the head reads the embedding's own initializer: the tie survived
            alias = f"{use.node}:B"
            tensors.add_alias(alias, emb, transposed=sum(1 for v in use.via if v.startswith("Transpose")) % 2 == 1)
            if emb in spans:
                spans[alias] = spans[emb]
            aliases.append(alias)
            pair(emb, emb, use, "one tensor", 0, alias)
        if uses:
            notes.append(f"{emb} {list(e.shape)} is read by {gather_text} (embedding) and by "
                         f"{_listed([_describe(u) for u in uses])} (head): one initializer, the tie survived the "
                         f"export (the head's use is listed as {_listed([f'{u.node}:B' for u in uses])})")
    for head, (emb, relation) in copies.items():
        e, h = tensors[emb], tensors[head]
        uses = [u for u in heads[head] if relation == "transposed copy" or u.transposes % 2]
        nbytes = h.numel() * h.element_size()
        for use in uses:
            pair(emb, head, use, relation, nbytes)
        use_text = _listed([_describe(u) for u in uses])
        notes.append(f"{emb} {list(e.shape)} is read by {_listed([_describe(g) for g in embeddings[emb]])} "
                     f"(embedding); the head {use_text} reads {head} {list(h.shape)}, a {relation} of it: the tie "
                     f"was lost in the export ({nbytes:,} bytes stored twice)")
        if relation == "transposed copy":
            # Equal-shape copies are the content pass's (TC005); a transposed copy is
            # found here, from the graph, where the two uses are known.
            found.append(finding(
                "TC005", f"{head} {list(h.shape)} holds the transpose of {emb} {list(e.shape)} in "
                         f"separate memory: the export stored the tied embedding twice, once "
                         f"transposed for {use_text} ({nbytes:,} bytes wasted)", (emb, head),
                hint="Export with the torch.export-based exporter (torch.onnx.export(..., "
                     "dynamo=True)), which keeps one initializer, or deduplicate the model so "
                     "the head reads Transpose(embedding)."))
    if len(pairs) >= MAX_PAIRS:
        notes.append(f"the graph's embedding/head pairs are listed up to {MAX_PAIRS:,}")
    return pairs, found, aliases


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
