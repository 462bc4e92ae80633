"""GGUF files (llama.cpp), read with the ``gguf`` package's memory-mapped ``GGUFReader``.

A GGUF file is a header (magic, version, tensor and key/value counts), key/value metadata,
tensor infos (name, dims, ggml type, offset) and aligned tensor data. The fixed header is
checked here before ``GGUFReader`` walks the rest, so counts that no file of this size could
hold are refused with one line instead of a long loop; whatever the reader still rejects
(unknown types, truncated strings, data past the end) becomes one line too.

Tensors become views of one read-only mapping of the file (with file spans, so the content
pass reads with pread). Unquantized tensors keep their dtype and numpy shape (ggml lists dims
innermost first; ``token_embd.weight`` comes back as [vocab, embedding]); quantized tensors are
their stored blocks as uint8 rows, so equal blocks mean equal tensors.

llama.cpp's rule: a model without ``output.weight`` uses ``token_embd.weight`` for the output
at load. That declared tie is added as an alias, so it is a tie group; an ``output.weight``
that stores the embedding again is an untied duplicate the content pass finds.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from tiecheck.errors import TargetError
from tiecheck.findings import finding
from tiecheck.loaders.fileview import FileSpan, map_file
from tiecheck.loaders.subject import Source, Subject

EMBEDDING, OUTPUT = "token_embd.weight", "output.weight"
MAX_DIMS = 4  # GGML_MAX_DIMS
# The smallest key/value (8-byte key length, 4-byte type, a 1-byte value) and tensor info
# (8-byte name length, 4-byte n_dims, 4-byte type, 8-byte offset).
MIN_KV_BYTES, MIN_TENSOR_BYTES = 13, 24
MAX_BYTES = (1 << 63) - 1

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


def _field(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None or not f.types:
        return None
    try:
        if f.types[0] == GGUFValueType.ARRAY:
            return len(f.data)
        value = f.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return value if isinstance(value, (int, float, str)) else None


def read(path: Path) -> GGUFReader:
    try:
        check_header(path)
        return GGUFReader(os.fspath(path), "r")
    except TargetError:
        raise
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e.strerror or e})") from e
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, UnicodeDecodeError,
            MemoryError) as e:
        text = (str(e).splitlines() or [type(e).__name__])[0][:160] or type(e).__name__
        raise _bad(path, f"{text} (the file is truncated or corrupt)") from e


def load_gguf(path: Path) -> Subject:
    """A GGUF file's tensors (mapped), its architecture metadata and llama.cpp's output tie."""
    reader = read(path)
    size = path.stat().st_size
    storage = map_file(path, size, str(path))
    tensors: dict[str, torch.Tensor] = {}
    spans: dict[str, FileSpan] = {}
    types: dict[str, dict] = {}
    quantized = 0
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        if len(dims) > MAX_DIMS:
            raise _bad(path, f"tensor {t.name!r} has {len(dims)} dims; ggml allows {MAX_DIMS}")
        qtype = GGMLQuantizationType(t.tensor_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        numel = 1
        for d in dims:
            numel *= d
            if numel * type_size > MAX_BYTES:
                raise _bad(path, f"tensor {t.name!r} has dims {dims}: more bytes than any file can hold")
        nbytes = numel * type_size // block
        if t.data_offset + nbytes > size:
            raise _bad(path, f"tensor {t.name!r} needs bytes {t.data_offset:,}..{t.data_offset + nbytes:,} but "
                             f"the file holds {size:,}: it is truncated; download it again")
        if qtype == GGMLQuantizationType.BF16:  # GGUFReader hands bf16 back as raw bytes: view them as bf16
            shape, dtype, itemsize = tuple(reversed(dims)), torch.bfloat16, 2
        else:
            shape = tuple(int(n) for n in t.data.shape)
            dtype = _NUMPY_TO_TORCH.get(t.data.dtype)
            if dtype is None:
                raise _bad(path, f"tensor {t.name!r} has numpy type {t.data.dtype}, which tiecheck cannot map")
            itemsize = t.data.dtype.itemsize
        if nbytes == 0:
            value = torch.empty(shape, dtype=dtype)
        elif t.data_offset % itemsize == 0:
            value = torch.empty(0, dtype=dtype).set_(storage, t.data_offset // itemsize, shape)
            spans[t.name] = FileSpan(os.fspath(path), 0)
        else:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, t.data_offset, (nbytes,))
            value = raw.clone().view(dtype).reshape(shape)
        tensors[t.name] = value
        is_q = qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                             GGMLQuantizationType.F64,
                             GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                             GGMLQuantizationType.I64)
        quantized += is_q
        types[t.name] = {"type": qtype.name, "shape": list(reversed(dims)), "bytes": nbytes, "quantized": is_q}
    if not tensors:
        raise TargetError(f"{path}: the GGUF file holds no tensors")

    arch = _field(reader, "general.architecture")
    meta = {"architecture": arch, "name": _field(reader, "general.name"),
            "vocab_size": _field(reader, f"{arch}.vocab_size") if arch else None,
            "embedding_length": _field(reader, f"{arch}.embedding_length") if arch else None,
            "tokens": _field(reader, "tokenizer.ggml.tokens"),
            "file_type": _field(reader, "general.file_type"), "version": _field(reader, "GGUF.version")}
    if meta["vocab_size"] is None and meta["tokens"] is not None:
        meta["vocab_size"] = meta["tokens"]
    notes = [f"GGUF v{meta['version']}: {len(tensors)} tensors ({quantized} quantized), {len(reader.fields)} metadata "
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
