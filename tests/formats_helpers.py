"""Writers for hand-made checkpoints: exact safetensors bytes (good and corrupt), tiny HF configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
            torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


def safetensors_bytes(tensors: dict, *, pad_to: int = 8, metadata: dict | None = None,
                      header_edit=None) -> bytes:
    """The bytes safetensors would write (header padded with spaces to ``pad_to``)."""
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        b = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if header_edit is not None:
        header_edit(header)
    hb = json.dumps(header).encode()
    if pad_to > 1:
        hb += b" " * (-len(hb) % pad_to)
    return len(hb).to_bytes(8, "little") + hb + b"".join(blobs)


def write_safetensors(path: Path, tensors: dict, **kw) -> Path:
    path.write_bytes(safetensors_bytes(tensors, **kw))
    return path


def write_sharded(folder: Path, tensors: dict, shards: int = 2, prefix: str = "model") -> Path:
    """Split tensors over ``shards`` safetensors files plus ``{prefix}.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"{prefix}-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, {n: tensors[n] for n in part})
        weight_map.update({n: fname for n in part})
    index = folder / f"{prefix}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index
