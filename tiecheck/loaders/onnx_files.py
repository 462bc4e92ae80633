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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from tiecheck.errors import TargetError
from tiecheck.findings import finding
from tiecheck.loaders.fileview import FileSpan, map_file
from tiecheck.loaders.subject import Source, Subject

MAX_PROTO = (2 << 30) - 1  # protobuf refuses messages of 2 GiB and more; larger models use external data
MAX_BYTES = (1 << 63) - 1
BLOCK_BYTES = 16 << 20  # bounded reads when comparing two initializers

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


@dataclass
class _Files:
    """One read-only mapping per external data file."""

    storages: dict[Path, tuple[Any, int]] = field(default_factory=dict)

    def storage(self, p: Path, model: Path, name: str):
        if p not in self.storages:
            try:
                size = p.stat().st_size
            except OSError as e:
                raise TargetError(f"{model}: external data {p.name} of initializer {name!r} cannot be read "
                                  f"({e.strerror or e}); copy it next to the model") from e
            st = map_file(p, size, f"{model}: external data of initializer {name!r}") if size else None
            self.storages[p] = (st, size)
        return self.storages[p]


def _initializer(path: Path, t: TensorProto, files: _Files, spans: dict, notes: list[str]):
    """One initializer as a torch tensor (a view of its external file where it has one), or None."""
    dname = DTYPES.get(t.data_type)
    dtype = getattr(torch, dname, None) if dname else None
    if dtype is None:
        return None
    itemsize = torch.empty(0, dtype=dtype).element_size()
    dims = [int(d) for d in t.dims]
    numel = _numel(path, t.name, dims, itemsize)
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
            raise _bad(path, f"initializer {t.name!r} ({dname} {dims}) needs {nbytes:,} bytes but its external "
                             f"data says offset {offset:,}, length {length:,}")
        storage, size = files.storage(p, path, t.name)
        if offset + length > size:
            raise TargetError(f"{path}: initializer {t.name!r} needs bytes {offset:,}..{offset + length:,} of "
                              f"{p.name}, which holds {size:,}: the data file is truncated; copy it again")
        if nbytes == 0:
            return torch.empty(dims, dtype=dtype)
        if offset % itemsize == 0:
            spans[t.name] = FileSpan(os.fspath(p), 0)
            return torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, dims)
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (nbytes,))
        notes.append(f"{t.name}: external data at an unaligned offset, copied into memory")
        return raw.clone().view(dtype).reshape(dims)
    if t.HasField("raw_data"):
        if len(t.raw_data) != nbytes:
            raise _bad(path, f"initializer {t.name!r} ({dname} {dims}) needs {nbytes:,} bytes but holds "
                             f"{len(t.raw_data):,}")
        if nbytes == 0:
            return torch.empty(dims, dtype=dtype)
        return torch.frombuffer(bytearray(t.raw_data), dtype=torch.uint8).view(dtype).reshape(dims)
    try:
        arr = numpy_helper.to_array(t)
        return torch.from_numpy(np.ascontiguousarray(arr)).reshape(dims)
    except (ValueError, TypeError, RuntimeError) as e:
        raise _bad(path, f"initializer {t.name!r} cannot be read ({str(e)[:120]})") from e


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


def embedding_heads(tensors: dict[str, torch.Tensor], spans: dict[str, FileSpan], graph,
                    notes: list[str]) -> tuple[list[dict], list[Any], dict[str, torch.Tensor]]:
    """How each embedding (Gather) initializer relates to each head (MatMul/Gemm) initializer.

    Returns the pairs (for the report), loader findings, and alias tensors for heads that read
    the embedding's own initializer.
    """
    embeddings, heads = graph_uses(graph, set(tensors))
    pairs: list[dict] = []
    found: list[Any] = []
    aliases: dict[str, torch.Tensor] = {}
    reader = _Reader(tensors, spans)
    try:
        for emb, gathers in embeddings.items():
            e = tensors[emb]
            if e.dim() != 2:
                continue
            for head, uses in heads.items():
                h = tensors[head]
                for use in uses:
                    base = {"embedding": emb, "embedding_nodes": [g.node for g in gathers], "head": head,
                            "head_node": use.node, "head_op": use.op, "via": list(use.via),
                            "shape": list(e.shape), "dtype": str(e.dtype).replace("torch.", "")}
                    gather_text = ", ".join(_describe(g) for g in gathers)
                    if head == emb:
                        alias = f"{use.node}:B"
                        aliases[alias] = e.t() if sum(1 for v in use.via if v.startswith("Transpose")) % 2 else e
                        if emb in spans:
                            spans[alias] = spans[emb]
                        pairs.append({**base, "relation": "one tensor", "alias": alias, "bytes_copied": 0})
                        notes.append(f"{emb} {list(e.shape)} is read by {gather_text} (embedding) and by "
                                     f"{_describe(use)} (head): one initializer, the tie survived the export "
                                     f"(the head's use is listed as {alias})")
                        continue
                    if h.dim() != 2 or h.dtype != e.dtype or h.numel() != e.numel():
                        continue
                    if tuple(h.shape) == tuple(e.shape)[::-1] and transposed_equal(reader, emb, head):
                        relation = "transposed copy"
                    elif h.shape == e.shape and use.transposes % 2 and plain_equal(reader, emb, head):
                        relation = "copy"
                    else:
                        continue
                    nbytes = h.numel() * h.element_size()
                    pairs.append({**base, "relation": relation, "bytes_copied": nbytes})
                    notes.append(f"{emb} {list(e.shape)} is read by {gather_text} (embedding); the head "
                                 f"{_describe(use)} reads {head} {list(h.shape)}, a {relation} of it: the tie was "
                                 f"lost in the export ({nbytes:,} bytes stored twice)")
                    if relation == "transposed copy":
                        # Equal-shape copies are the content pass's (TC005); a transposed copy is
                        # found here, from the graph, where the two uses are known.
                        found.append(finding(
                            "TC005", f"{head} {list(h.shape)} holds the transpose of {emb} {list(e.shape)} in "
                                     f"separate memory: the export stored the tied embedding twice, once "
                                     f"transposed for {_describe(use)} ({nbytes:,} bytes wasted)", (emb, head),
                            hint="Export with the torch.export-based exporter (torch.onnx.export(..., "
                                 "dynamo=True)), which keeps one initializer, or deduplicate the model so "
                                 "the head reads Transpose(embedding)."))
    finally:
        reader.close()
    return pairs, found, aliases


def load_onnx(path: Path) -> Subject:
    """An ONNX model's initializers as tensors, with the embedding/head ties its graph shows."""
    model = read_model(path)
    graph = model.graph
    files = _Files()
    tensors: dict[str, torch.Tensor] = {}
    spans: dict[str, FileSpan] = {}
    notes: list[str] = []
    skipped: list[str] = []
    external = 0
    for t in graph.initializer:
        if t.name in tensors or not t.name:
            raise _bad(path, f"initializer name {t.name!r} is empty or used twice")
        value = _initializer(path, t, files, spans, notes)
        if value is None:
            skipped.append(t.name)
            continue
        external += t.data_location == TensorProto.EXTERNAL
        tensors[t.name] = value
    if skipped:
        notes.append(f"skipped {len(skipped)} initializer(s) of types tiecheck does not read (e.g. {skipped[0]})")
    if len(graph.sparse_initializer):
        notes.append(f"skipped {len(graph.sparse_initializer)} sparse initializer(s)")
    if not tensors:
        raise TargetError(f"{path}: the ONNX graph holds no initializers (no weights to analyse)")
    pairs, found, aliases = embedding_heads(tensors, spans, graph, notes)
    tensors.update(aliases)
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
