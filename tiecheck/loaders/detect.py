"""Recognise a checkpoint by its bytes, never by its name.

``pytorch_model.bin``, ``model.pt`` and ``weights.ckpt`` are all ``torch.save`` zips;
TorchScript and ``torch.export`` archives are zips too; a ``.safetensors`` file starts with an
8-byte header length followed by JSON. Only a few bytes (and, for zips, the central
directory) are read here; each loader validates its format fully.
"""

from __future__ import annotations

from pathlib import Path

from tiecheck.errors import TargetError
from tiecheck.loaders.safejson import parse_json
from tiecheck.loaders.zipcheck import ZipArchive

TORCH_SAVE = "torch.save"
TORCH_SAVE_LEGACY = "torch.save (legacy)"
TORCHSCRIPT = "TorchScript"
PT2 = "torch.export"
SAFETENSORS = "safetensors"
WEIGHTS_INDEX = "weights index"
ONNX = "ONNX"
GGUF = "GGUF"

# A weights index (model.safetensors.index.json) is a few MB at most; never parse a large file as one.
_INDEX_LIMIT = 64 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def sniff_file(path: Path) -> str | None:
    """The format of a file from its content, or None when no loader knows it. Raises OSError."""
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as fh:
        head = fh.read(16)
    if head.startswith(_ZIP_MAGIC):
        return zip_kind(path)
    # Safetensors first: a header of 640, 896, 1152 or 1408 bytes (mod 65,536) starts its length field with
    # the bytes of a pickle's PROTO 2-5, while a legacy torch.save never has a "{" at byte 8 (its magic
    # number, or a protocol 4-5 frame length, is there).
    if looks_like_safetensors(head):
        return SAFETENSORS
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return TORCH_SAVE_LEGACY
    if head.startswith(_GGUF_MAGIC):
        return GGUF
    if looks_like_onnx(head):
        return ONNX
    if head.lstrip()[:1] == b"{" and size <= _INDEX_LIMIT and _sniff_weights_index(path, size):
        return WEIGHTS_INDEX
    return None


def looks_like_safetensors(head: bytes) -> bool:
    """8 little-endian bytes of header length, then the JSON header's opening brace.

    A header length larger than the file still counts: the loader then says the file is
    truncated, which helps more than "unknown format".
    """
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < (1 << 40)


# ModelProto field tags that may follow ir_version (field 1): producer_name, producer_version,
# domain, model_version, doc_string, graph, opset_import, metadata_props, training_info, functions.
_ONNX_NEXT_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA}
_GGUF_MAGIC = b"GGUF"


def looks_like_onnx(head: bytes) -> bool:
    """An ONNX ModelProto: protobuf has no magic, but every exporter writes ``ir_version`` (field 1,
    a small varint) first, followed by another ModelProto field. The loader parses it fully."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_NEXT_TAGS


def zip_kind(path: Path) -> str | None:
    """torch.save, TorchScript or torch.export: all three are zips with one root folder."""

    try:
        with ZipArchive(path, str(path)) as za:
            names = za.names()
            fmt = [n for n in names if n.count("/") == 1 and n.endswith("/archive_format")]
            if fmt and za.read(fmt[0], limit=64).strip() == b"pt2":
                return PT2
    except TargetError:
        # A damaged zip: the torch.save loader checks the archive again and names the damage.
        return TORCH_SAVE
    top = [n for n in names if n.count("/") == 1]
    if any(n.endswith("/constants.pkl") for n in top) and any("/code/" in n for n in names):
        return TORCHSCRIPT
    if any(n.endswith("/data.pkl") for n in top):
        return TORCH_SAVE
    return None


def read_weights_index(path: Path) -> dict | None:
    """A ``*.index.json`` weights index (``{"weight_map": {name: shard}}``), or None if it is not one.

    Detection and loading both need the parsed index: the parse ``sniff_file`` made is handed to
    the next reader of the same file version and then forgotten, so a 90,000-name index is parsed
    once and not kept for the rest of the run (a cache kept it: 20 MB at that size, while the
    analysis reached its peak). The caller owns what it gets.
    """
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size)
    sniffed = _sniffed.pop(key, None)
    return sniffed if sniffed is not None else _parse_index(key[0], st.st_size)


# The index sniff_file parsed last, by (path, mtime, size), until the loader reads it.
_sniffed: dict[tuple[str, int, int], dict] = {}


def _sniff_weights_index(path: Path, size: int) -> bool:
    """True when ``path`` is a weights index; its parse is kept for :func:`read_weights_index`."""
    try:
        st = path.stat()
    except OSError:
        return False
    obj = _parse_index(str(path), size)
    if obj is None:
        return False
    _sniffed.clear()  # one at most: a folder of many indexes keeps none of the others alive
    _sniffed[(str(path), st.st_mtime_ns, st.st_size)] = obj
    return True


def _parse_index(path: str, size: int) -> dict | None:
    if size > _INDEX_LIMIT:
        return None
    try:
        with open(path, "rb") as fh:
            # size + 1: a file that grew since stat() fails to parse instead of being read whole
            raw = fh.read(size + 1)
        if len(raw) > _INDEX_LIMIT:
            return None
        # A key that reads "weight_map" is spelled so in the bytes, unless a \u escape spells it: a
        # file with neither is no index, and is not parsed (a 20 MB report written over by the next).
        if b"weight_map" not in raw and b"\\u" not in raw:
            return None
        obj = parse_json(raw)
    except (ValueError, OSError):
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("weight_map"), dict)):
        return None
    return obj


# Folders, recognised by the files they hold.
DCP_METADATA = ".metadata"
HF_CONFIG = "config.json"


def is_dcp_folder(path: Path) -> bool:
    """A torch.distributed.checkpoint folder: a ``.metadata`` file beside ``*.distcp`` data files."""
    return (path / DCP_METADATA).is_file() and any(p.suffix == ".distcp" for p in path.iterdir())


def is_peft_folder(path: Path) -> bool:
    """A PEFT adapter folder: an ``adapter_config.json`` (peft's ``save_pretrained``)."""
    return (path / "adapter_config.json").is_file()


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: a ``config.json`` (the weights beside it are looked for later)."""
    return (path / HF_CONFIG).is_file()
