"""Checkpoint builders and editors for the tests: safetensors written by hand (so headers can be
anything), tiny state dicts and a tiny Llama folder, zip structure for aiming edits, and the
bit-level edits the hostile-file and fuzz tests make."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import stat
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
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


def sharded_head_copy(folder: Path, rows: int, shards: int) -> Path:
    """A bare sharded checkpoint (no config): four (rows, rows) layers and a head that is a clone of
    the first (an equal copy fix re-ties), over ``shards`` files; the index's path."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(rows, rows, generator=g) for i in range(4)}
    tensors["head.weight"] = tensors["layers.0.weight"].clone()
    return write_sharded(folder, tensors, shards=shards)


def tiny_state_dict(seed: int = 0) -> dict:
    """A tied embedding and head, a norm and a block: a few hundred bytes of tensors."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(8, 4, generator=g)
    return {"embed.weight": emb, "head.weight": emb, "norm.weight": torch.ones(4),
            "norm.bias": torch.zeros(4), "block.weight": torch.randn(4, 4, generator=g),
            "step": torch.tensor(3)}


def cloned(sd: dict) -> dict:
    """Every tensor its own copy: the state dict of a tie broken on save."""
    return {k: v.clone() for k, v in sd.items()}


def llama_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 32, "tie_word_embeddings": True}


def llama_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
              "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
              "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (4, 8),
              "model.layers.0.self_attn.v_proj.weight": (4, 8), "model.layers.0.self_attn.o_proj.weight": (8, 8),
              "model.layers.0.mlp.gate_proj.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
              "model.layers.0.mlp.down_proj.weight": (8, 16)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@dataclass
class ZipField:
    """A little-endian integer field of a zip or GGUF header: where it is and what it holds."""

    where: str  # e.g. "central[2].compress_size"
    offset: int
    size: int
    value: int


@dataclass
class Structure:
    boundaries: list[int] = field(default_factory=list)  # offsets where a parser changes state
    regions: list[tuple[int, int]] = field(default_factory=list)  # byte ranges parsers interpret
    fields: list[ZipField] = field(default_factory=list)  # zip header fields worth editing
    names: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of zip entry names


_LOCAL = [("method", 8, 2), ("crc", 14, 4), ("compress_size", 18, 4), ("file_size", 22, 4), ("name_len", 26, 2),
          ("extra_len", 28, 2)]
_CENTRAL = [("version_needed", 6, 2), ("flags", 8, 2), ("method", 10, 2), ("crc", 16, 4), ("compress_size", 20, 4),
            ("file_size", 24, 4), ("name_len", 28, 2), ("extra_len", 30, 2), ("comment_len", 32, 2),
            ("header_offset", 42, 4)]
_EOCD = [("disk_entries", 8, 2), ("total_entries", 10, 2), ("cd_size", 12, 4), ("cd_offset", 16, 4),
         ("comment_len", 20, 2)]


def _fields(data: bytes, base: int, spec, label: str) -> list[ZipField]:
    fmt = {2: "<H", 4: "<I"}
    return [ZipField(f"{label}.{n}", base + off, size, struct.unpack_from(fmt[size], data, base + off)[0])
            for n, off, size in spec]


def zip_structure(data: bytes) -> Structure:
    """Local headers, data records, central directory entries and end record of every zip in ``data``.

    A DCP ``.distcp`` file is several zips back to back (one per chunk); each end record locates
    its own directory, relative to where its zip starts.
    """
    s = Structure()
    eocd = data.find(b"PK\x05\x06")
    while eocd != -1 and eocd + 22 <= len(data):
        cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
        base = eocd - cd_size - cd_offset  # where this zip starts in the file
        if data[eocd - 20:eocd - 16] == b"PK\x06\x07":  # a zip64 end record and locator sit before it
            base -= 56 + 20
        if base >= 0:
            _one_zip(data, s, base, base + cd_offset, cd_size, eocd)
        eocd = data.find(b"PK\x05\x06", eocd + 4)
    s.boundaries = sorted({b for b in s.boundaries if 0 < b < len(data)})
    return s


def _one_zip(data: bytes, s: Structure, base: int, cd_start: int, cd_size: int, eocd: int) -> None:
    pos, i = cd_start, len([f for f in s.fields if f.where.endswith(".header_offset")])
    while pos < cd_start + cd_size and data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        s.boundaries += [pos, pos + 46]
        s.regions.append((pos, pos + 46 + n + m + k))
        s.fields += _fields(data, pos, _CENTRAL, f"central[{i}]")
        s.names.append((pos + 46, n))
        local = base + struct.unpack_from("<I", data, pos + 42)[0]
        csize = struct.unpack_from("<I", data, pos + 20)[0]
        ln, lm = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + ln + lm
        s.boundaries += [local, local + 30, start, start + csize]
        s.regions.append((local, start))
        s.fields += _fields(data, local, _LOCAL, f"local[{i}]")
        s.names.append((local + 30, ln))
        pos += 46 + n + m + k
        i += 1
    s.boundaries += [cd_start, eocd, eocd + 22]
    s.regions.append((eocd, eocd + 22))
    s.fields += _fields(data, eocd, _EOCD, f"eocd@{eocd}")


def safetensors_structure(data: bytes) -> Structure:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    s = Structure(boundaries=[1, 4, 7, 8, 9, 8 + n - 1, 8 + n], regions=[(0, 8 + n)])
    for name, spec in header.items():
        if name != "__metadata__":
            a, b = spec["data_offsets"]
            s.boundaries += [8 + n + a, 8 + n + b]
    s.boundaries = sorted({b for b in s.boundaries if 0 < b < len(data)})
    return s


def structure(data: bytes) -> Structure:
    """Where a file's parsers decide things; the whole file for JSON and pickles."""
    if data[:4] == b"PK\x03\x04":
        return zip_structure(data)
    if len(data) > 9 and data[8:9] == b"{":
        return safetensors_structure(data)
    if data[:4] == b"GGUF":
        return gguf_structure(data)
    if data[:1] == b"\x08" and (onnx := onnx_structure(data)) is not None:  # field 1 (ir_version), a varint
        return onnx
    if data[:1] == b"\x80":  # a pickle (legacy torch.save, DCP .metadata): every byte is an opcode or argument
        return Structure(boundaries=_pickle_boundaries(data), regions=[(0, len(data))])
    return Structure(boundaries=sorted({1, len(data) // 2, len(data) - 1}), regions=[(0, len(data))])


# GGUFValueType -> the size of one scalar; STRING (8) and ARRAY (9) are walked.
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_structure(data: bytes) -> Structure:
    """A GGUF file's header counts, each key/value and tensor info, and where the data starts.

    Walked by hand (not with ``GGUFReader``) so every field's offset is known: the counts, string
    lengths, array counts, each tensor's n_dims, dims, type and data offset are editable fields.
    """
    s = Structure(boundaries=[4, 8, 16, 24], regions=[(0, 24)])
    s.fields += [ZipField("header.version", 4, 4, struct.unpack_from("<I", data, 4)[0]),
                 ZipField("header.tensor_count", 8, 8, struct.unpack_from("<Q", data, 8)[0]),
                 ZipField("header.kv_count", 16, 8, struct.unpack_from("<Q", data, 16)[0])]
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos = 24

    def u(fmt: str, where: str) -> int:
        nonlocal pos
        size = struct.calcsize(fmt)
        value = struct.unpack_from(fmt, data, pos)[0]
        s.fields.append(ZipField(where, pos, size, value))
        pos += size
        return value

    def string(where: str) -> None:
        nonlocal pos
        n = u("<Q", f"{where}.len")
        s.names.append((pos, n))
        pos += n

    def value(vtype: int, where: str) -> None:
        nonlocal pos
        if vtype == 8:
            string(where)
        elif vtype == 9:
            itype, count = u("<I", f"{where}.item_type"), u("<Q", f"{where}.count")
            for _ in range(count):
                value(itype, f"{where}[]")
        else:
            pos += _GGUF_SCALARS[vtype]

    for i in range(n_kv):
        start = pos
        string(f"kv[{i}].key")
        value(u("<I", f"kv[{i}].type"), f"kv[{i}].value")
        s.boundaries += [start, pos]
        s.regions.append((start, pos))
    for i in range(n_tensors):
        start = pos
        string(f"tensor[{i}].name")
        for _ in range(u("<I", f"tensor[{i}].n_dims")):
            u("<Q", f"tensor[{i}].dim")
        u("<I", f"tensor[{i}].type")
        u("<Q", f"tensor[{i}].offset")
        s.boundaries += [start, pos]
        s.regions.append((start, pos))
    s.boundaries.append(pos)
    s.boundaries = sorted({b for b in s.boundaries if 0 < b < len(data)})
    return s


def onnx_structure(data: bytes) -> Structure | None:
    """Each initializer of an ONNX model (its dims, type, name and external data fields), or None
    when ``data`` is no ONNX model. Found by serializing each initializer again and locating it."""
    try:
        import onnx  # noqa: PLC0415 - an optional extra; only ONNX fixtures need it
        model = onnx.ModelProto.FromString(data)
    except Exception:  # noqa: BLE001 - anything else starting with 0x08 is not a model
        return None
    if not model.HasField("graph") or not model.graph.initializer:
        return None
    s = Structure(boundaries=[1, 2])
    for t in model.graph.initializer:
        blob = t.SerializeToString()
        at = data.find(blob)
        if at < 0:
            continue
        s.boundaries += [at, at + len(blob)]
        s.regions.append((at, at + len(blob)))
        for e in t.external_data:
            for text in (e.key, e.value):
                i = data.find(text.encode(), at, at + len(blob))
                if i >= 0:
                    s.names.append((i, len(text.encode())))
    s.boundaries = sorted({b for b in s.boundaries if 0 < b < len(data)})
    return s


def _pickle_boundaries(data: bytes) -> list[int]:
    """Where each pickle of a file of concatenated pickles ends (legacy torch.save writes five)."""

    out, pos = [], 0

    buf = io.BytesIO(data)
    while pos < len(data):
        try:
            for _op, _arg, _p in pickletools.genops(buf):
                pass
        except Exception:  # noqa: BLE001 - raw storage bytes follow the last pickle
            break
        pos = buf.tell()
        out.append(pos)
        if data[pos:pos + 1] != b"\x80":
            break
    return sorted({b for b in out if 0 < b < len(data)} | {1, 2, len(data) - 1})


# -- cases -------------------------------------------------------------------------------------

def set_read_only(root: Path, read_only: bool) -> None:
    """chmod -R a-w (or back to u+w), folders included, without following symlinks."""
    paths = [root] + [Path(d) / n for d, ds, fs in os.walk(root) for n in ds + fs]
    for p in paths:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        p.chmod(mode & ~0o222 if read_only else mode | stat.S_IWUSR)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: its bytes and mtime (files), its target (links)."""
    out = {}
    for d, ds, fs in os.walk(root):
        for n in ds + fs:
            p = Path(d) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_bytes(), p.stat().st_mtime_ns)
            else:
                out[rel] = ("dir",)
    return out


INTERESTING_U32 = (0, 1, 0x7FFFFFFF, 0xFFFFFFFF)
INTERESTING_U64 = (0, 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1)
INTERESTING_U16 = (0, 1, 0x7FFF, 0xFFFF)


def flip_bits(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    b = bytearray(data)
    for p, bit in zip(positions, bits, strict=True):
        b[p % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


def set_field(data: bytes, f: ZipField, value: int) -> bytes:
    b = bytearray(data)
    value &= (1 << (8 * f.size)) - 1
    b[f.offset:f.offset + f.size] = value.to_bytes(f.size, "little")
    return bytes(b)


def field_values(f: ZipField, file_size: int) -> list[int]:
    """Values an edited header field takes: extremes, off by one, past the end of the file."""
    extremes = {2: INTERESTING_U16, 4: INTERESTING_U32}.get(f.size, INTERESTING_U64)
    return sorted({*extremes, f.value + 1, max(0, f.value - 1), f.value * 2 + 1, file_size, file_size + 1,
                   8 if f.where.endswith("method") else 0, 12 if f.where.endswith("method") else 0, 99})


def rewrite_zip_entry(src: Path, dst: Path, name_suffix: str, payload: bytes) -> None:
    """Copy a zip, replacing the record whose name ends with ``name_suffix`` (as a hand edit would)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = payload if info.filename.endswith(name_suffix) else zin.read(info)
            zout.writestr(info, data)


def safetensors_with_header(header, data_bytes: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file with a hand-written header (any JSON value) and a stated length."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    return n.to_bytes(8, "little", signed=False) + hb + data_bytes


def tensor_pickle(size: tuple, stride: tuple, numel: int = 4, name: str = "w") -> bytes:
    """data.pkl of {name: tensor} whose record states ``size`` and ``stride`` over a storage of ``numel`` floats."""
    class Claim(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, torch.Tensor):
                return torch._utils._rebuild_tensor_v2, (obj.untyped_storage(), 0, size, stride, False, OrderedDict())
            return NotImplemented

    buf = io.BytesIO()
    Claim(buf, protocol=2).dump({name: torch.zeros(min(numel, 4))})
    return buf.getvalue()
