"""GGUF files (llama.cpp): the header read here, the types and block sizes from the ``gguf`` package.

A GGUF file is a header (magic, version, tensor and key/value counts), key/value metadata,
tensor infos (name, dims, ggml type, offset) and aligned tensor data. ``gguf.GGUFReader`` is not
used to read it: it makes a numpy view for every element of every metadata array (a 4 MB file
holding one array of 4M bytes costs it 3 GB and 38 s; a real vocabulary of 256k tokens costs
it hundreds of MB) and recurses once per level of nested arrays. ``read_gguf`` walks the same
layout with ``struct`` over a mapping of the file: every length is checked against the bytes
left before it is used, an array is skipped by arithmetic (strings by their lengths) and kept
as its element type and count, nesting is bounded, and duplicate keys and tensor names are
refused as ``GGUFReader`` refuses them. The value types, ggml types, block sizes and byte
shapes are the ``gguf`` package's own (``GGUFValueType``, ``GGML_QUANT_SIZES``,
``quant_shape_to_byte_shape``), and the tests hold this reader to ``GGUFReader`` on real files.

Tensors become views of one read-only mapping of the file (with file spans, so the content
pass reads with pread). Unquantized tensors keep their dtype and numpy shape (ggml lists dims
innermost first; ``token_embd.weight`` comes back as [vocab, embedding]); quantized tensors are
their stored blocks as uint8 rows, so equal blocks mean equal tensors.

llama.cpp's rule: a model without ``output.weight`` uses ``token_embd.weight`` for the output
at load. That declared tie is added as an alias, so it is a tie group; an ``output.weight``
that stores the embedding again is an untied duplicate the content pass finds.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from tiecheck.errors import TargetError
from tiecheck.facts import Source
from tiecheck.findings import finding
from tiecheck.loaders.fileview import FileSpan, map_file
from tiecheck.loaders.subject import Subject

EMBEDDING, OUTPUT = "token_embd.weight", "output.weight"
MAX_DIMS = 4  # GGML_MAX_DIMS
# The smallest key/value (8-byte key length, 4-byte type, a 1-byte value) and tensor info
# (8-byte name length, 4-byte n_dims, 4-byte type, 8-byte offset).
MIN_KV_BYTES, MIN_TENSOR_BYTES = 13, 24
MAX_BYTES = (1 << 63) - 1
MAX_ARRAY_DEPTH = 4  # arrays of arrays: llama.cpp writes none; GGUFReader recursed once per level
MAX_STRING_KEPT = 4096  # longer metadata strings are skipped, not kept (none that is read is long)
MAX_NAME_BYTES = 64 << 10  # a key or tensor name; ggml's own limit is 64 bytes

# Fixed-size value types: struct format (little-endian) of one element.
_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
            GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f",
            GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
            GGUFValueType.FLOAT64: "d"}
# ggml types GGUFReader hands back as numpy arrays of their own dtype; every other is raw uint8 blocks.
_PLAIN = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}

_NUMPY_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                   np.dtype(np.float64): torch.float64, np.dtype(np.int8): torch.int8,
                   np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32,
                   np.dtype(np.int64): torch.int64, np.dtype(np.uint8): torch.uint8}

FLOPS_REASON = ("FLOPs are counted for PyTorch modules only; a GGUF file holds tensors and metadata, no "
                "traceable module (inspect the PyTorch model or its Hugging Face folder for FLOPs)")


def _bad(path: Path, why: str) -> TargetError:
    return TargetError(f"{path}: not a valid GGUF file: {why}")


def check_header(path: Path) -> tuple[int, int, int]:
    """(version, tensor count, key/value count) after checking the counts fit the file."""
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise _bad(path, f"{size} bytes is too short to hold the 24-byte header" if len(head) < 24
                   else "the magic is not GGUF")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise _bad(path, f"version {version}; tiecheck reads GGUF versions 2 and 3")
    if n_tensors * MIN_TENSOR_BYTES + n_kv * MIN_KV_BYTES > size - 24:
        raise _bad(path, f"the header claims {n_tensors:,} tensors and {n_kv:,} metadata keys, more than "
                         f"{size:,} bytes can hold: the file is truncated or corrupt")
    return version, n_tensors, n_kv


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array, kept as its element type and length (its elements are not read)."""

    type: GGUFValueType
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: innermost first
    type: int  # the raw ggml type number
    offset: int  # from the start of the data section


@dataclass
class GgufFile:
    version: int
    fields: dict[str, Any]  # key -> int, float, bool, str (None when longer than MAX_STRING_KEPT), ArrayValue
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0


class _Cursor:
    """Reads little-endian values from a mapping, each checked against the bytes left."""

    def __init__(self, buf, path: Path, pos: int):
        self.buf, self.path, self.pos, self.size = buf, path, pos, len(buf)

    def take(self, n: int, what: str) -> int:
        """Advance past ``n`` bytes; the offset where they start."""
        if n < 0 or self.pos + n > self.size:
            raise _bad(self.path, f"{what} at byte {self.pos:,} needs {n:,} bytes but the file holds "
                                  f"{self.size - self.pos:,} more: it is truncated or corrupt")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        at = self.take(struct.calcsize("<" + fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, at)[0]

    def string(self, what: str, keep: int) -> str | None:
        n = self.unpack("Q", what)
        at = self.take(n, what)
        if n > keep:
            return None
        try:
            return bytes(self.buf[at:at + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(self.path, f"{what} at byte {at:,} is not UTF-8") from e


def _value_type(raw: int, cur: _Cursor, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _bad(cur.path, f"{what} has value type {raw}, which GGUF does not define") from None


def _value(cur: _Cursor, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
    """One metadata value; arrays are skipped and described (elements are never made one by one)."""
    fmt = _SCALARS.get(vtype)
    if fmt is not None:
        return cur.unpack(fmt, what)
    if vtype == GGUFValueType.STRING:
        return cur.string(what, MAX_STRING_KEPT)
    # An array: element type, count, elements.
    etype = _value_type(cur.unpack("I", what), cur, what)
    count = cur.unpack("Q", what)
    fmt = _SCALARS.get(etype)
    if fmt is not None:
        cur.take(count * struct.calcsize("<" + fmt), f"{what} ({count:,} elements)")
    elif etype == GGUFValueType.STRING:
        if count * 8 > cur.size - cur.pos:  # every string needs at least its 8-byte length
            raise _bad(cur.path, f"{what} claims {count:,} strings, more than the file can hold")
        for _ in range(count):
            cur.take(cur.unpack("Q", what), what)
    else:  # arrays of arrays
        if depth + 1 >= MAX_ARRAY_DEPTH:
            raise _bad(cur.path, f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        if count * 12 > cur.size - cur.pos:  # each inner array needs its type and count
            raise _bad(cur.path, f"{what} claims {count:,} arrays, more than the file can hold")
        for _ in range(count):
            _value(cur, etype, what, depth + 1)
    return ArrayValue(etype, count)


def parse(buf, path: Path) -> GgufFile:
    """The header, metadata and tensor infos of a GGUF file held in ``buf`` (a mapping of it).

    Raises:
        TargetError: counts, lengths or types the bytes cannot hold or GGUF does not define.
    """
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    cur = _Cursor(buf, path, 24)
    # The header's own numbers, under the names GGUFReader gives them.
    fields: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}", MAX_NAME_BYTES)
        if key is None:
            raise _bad(path, f"metadata key {i} is longer than {MAX_NAME_BYTES:,} bytes")
        what = f"metadata {key!r}"
        vtype = _value_type(cur.unpack("I", what), cur, what)
        if key in fields:
            raise _bad(path, f"metadata key {key!r} appears twice")
        fields[key] = _value(cur, vtype, what)
    gguf = GgufFile(version, fields)
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor info {i}", MAX_NAME_BYTES)
        if name is None:
            raise _bad(path, f"the name of tensor {i} is longer than {MAX_NAME_BYTES:,} bytes")
        n_dims = cur.unpack("I", f"tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise _bad(path, f"tensor {name!r} has {n_dims} dims; ggml allows {MAX_DIMS}")
        dims = tuple(cur.unpack("Q", f"tensor {name!r}") for _ in range(n_dims))
        raw_type = cur.unpack("I", f"tensor {name!r}")
        offset = cur.unpack("Q", f"tensor {name!r}")
        if name in names:
            raise _bad(path, f"tensor name {name!r} appears twice")
        names.add(name)
        gguf.tensors.append(TensorInfo(name, dims, raw_type, offset))
    alignment = fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise _bad(path, f"general.alignment {alignment!r} is not a power of two")
    gguf.data_offset = cur.pos + (-cur.pos % alignment)
    return gguf


def _field(gguf: GgufFile, key: str) -> Any:
    value = gguf.fields.get(key)
    if isinstance(value, ArrayValue):
        return value.length
    return value if isinstance(value, (int, float, str)) else None


def read_gguf(path: Path) -> GgufFile:
    """The parsed header, metadata and tensor infos of a GGUF file.

    Raises:
        TargetError: the file cannot be read, or is not a GGUF file tiecheck reads.
    """
    check_header(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parse(buf, path)
    except (OSError, ValueError) as e:
        raise TargetError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from e


def _tensor_layout(path: Path, t: TensorInfo) -> tuple[GGMLQuantizationType, int, tuple[int, ...], Any]:
    """(ggml type, bytes, numpy shape, numpy dtype) of a tensor, as GGUFReader hands it back."""
    try:
        qtype = GGMLQuantizationType(t.type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _bad(path, f"tensor {t.name!r} has ggml type {t.type}, which gguf does not define") from None
    numel = 1
    for d in t.dims:
        numel *= d
        if numel * type_size > MAX_BYTES:
            raise _bad(path, f"tensor {t.name!r} has dims {list(t.dims)}: more bytes than any file can hold")
    shape = tuple(reversed(t.dims))
    np_dtype = _PLAIN.get(qtype)
    if np_dtype is None:
        try:
            shape = quant_shape_to_byte_shape(shape, qtype) if shape else shape
        except ValueError as e:
            raise _bad(path, f"tensor {t.name!r}: {e}") from e
        np_dtype = np.uint8
    return qtype, numel * type_size // block, shape, np.dtype(np_dtype)


def load_gguf(path: Path) -> Subject:
    """A GGUF file's tensors (mapped), its architecture metadata and llama.cpp's output tie."""
    gguf = read_gguf(path)
    size = path.stat().st_size
    storage = map_file(path, size, str(path))
    tensors: dict[str, torch.Tensor] = {}
    spans: dict[str, FileSpan] = {}
    types: dict[str, dict] = {}
    quantized = 0
    for t in gguf.tensors:
        qtype, nbytes, shape, np_dtype = _tensor_layout(path, t)
        start = gguf.data_offset + t.offset
        if start + nbytes > size:
            raise _bad(path, f"tensor {t.name!r} needs bytes {start:,}..{start + nbytes:,} but "
                             f"the file holds {size:,}: it is truncated; download it again")
        if qtype == GGMLQuantizationType.BF16:  # raw bytes to GGUFReader: viewed as bf16 here
            shape, dtype, itemsize = tuple(reversed(t.dims)), torch.bfloat16, 2
        else:
            dtype = _NUMPY_TO_TORCH.get(np_dtype)
            if dtype is None:
                raise _bad(path, f"tensor {t.name!r} has numpy type {np_dtype}, which tiecheck cannot map")
            itemsize = np_dtype.itemsize
        if nbytes == 0:
            value = torch.empty(shape, dtype=dtype)
        elif start % itemsize == 0:
            value = torch.empty(0, dtype=dtype).set_(storage, start // itemsize, shape)
            spans[t.name] = FileSpan(os.fspath(path), 0)
        else:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, start, (nbytes,))
            value = raw.clone().view(dtype).reshape(shape)
        tensors[t.name] = value
        is_q = qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                             GGMLQuantizationType.F64,
                             GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                             GGMLQuantizationType.I64)
        quantized += is_q
        types[t.name] = {"type": qtype.name, "shape": list(reversed(t.dims)), "bytes": nbytes, "quantized": is_q}
    if not tensors:
        raise TargetError(f"{path}: the GGUF file holds no tensors")

    arch = _field(gguf, "general.architecture")
    meta = {"architecture": arch, "name": _field(gguf, "general.name"),
            "vocab_size": _field(gguf, f"{arch}.vocab_size") if arch else None,
            "embedding_length": _field(gguf, f"{arch}.embedding_length") if arch else None,
            "tokens": _field(gguf, "tokenizer.ggml.tokens"),
            "file_type": _field(gguf, "general.file_type"), "version": _field(gguf, "GGUF.version")}
    if meta["vocab_size"] is None and meta["tokens"] is not None:
        meta["vocab_size"] = meta["tokens"]
    notes = [f"GGUF v{meta['version']}: {len(tensors)} tensors ({quantized} quantized), {len(gguf.fields)} metadata "
             f"keys; architecture {arch or 'not given'}, vocab {meta['vocab_size'] or '?'}, embedding length "
             f"{meta['embedding_length'] or '?'}; data memory-mapped"]
    found = []
    tie = None
    if EMBEDDING in tensors and OUTPUT not in tensors:
        tensors[OUTPUT] = tensors[EMBEDDING]
        if EMBEDDING in spans:
            spans[OUTPUT] = spans[EMBEDDING]
        tie = "declared"
        notes.append(f"{OUTPUT} is absent: llama.cpp uses {EMBEDDING} for the output at load (a declared tie)")
        found.append(finding("TC012", f"{OUTPUT} is absent from the file: llama.cpp ties it to {EMBEDDING} at "
                                      f"load", (EMBEDDING, OUTPUT),
                             hint="Nothing to do: llama.cpp reuses token_embd.weight for the output."))
    elif EMBEDDING in tensors:
        e, o = types[EMBEDDING], types[OUTPUT]
        tie = "stored"
        if e["type"] == o["type"] and e["shape"] == o["shape"]:
            notes.append(f"{OUTPUT} is stored beside {EMBEDDING} ({o['type']} {o['shape']}); llama.cpp ties them "
                         f"only when {OUTPUT} is absent: equal content is reported as an untied duplicate")
        else:
            notes.append(f"{OUTPUT} ({o['type']} {o['shape']}) and {EMBEDDING} ({e['type']} {e['shape']}) are "
                         f"stored separately")
    if quantized:
        notes.append("quantized tensors are compared by their stored blocks (uint8 rows): equal blocks, equal "
                     "tensors")
    extra = {"gguf": {**meta, "tensor_types": types, "output_tie": tie, "file_bytes": size},
             "flops_unavailable": FLOPS_REASON}
    return Subject(tensors=tensors, source=Source(target=str(path), format="GGUF", notes=notes),
                   loader_findings=found, extra=extra, file_spans=spans)
