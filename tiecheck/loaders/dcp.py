"""``torch.distributed.checkpoint`` folders: ``.metadata`` plus ``*.distcp`` data files.

The metadata names every tensor with its global shape, dtype and chunks, and says which file
and byte range holds each chunk. It is read through DCP's own ``FileSystemReader`` and
metadata classes, with one change: ``FileSystemReader.read_metadata`` calls ``pickle.load``
on the file, which runs code from an untrusted checkpoint. Here the same pickle is read by an
unpickler that accepts only DCP's metadata classes, ``torch.Size``, dtypes and paths.

Each chunk in a ``.distcp`` file is a small ``torch.save`` archive. A chunk that covers its
whole tensor becomes a view into one memory mapping of the file (its pickle is read by the
weights-only unpickler; its bytes are mapped, not read), so nothing is loaded until the
content pass samples it. Tensors split across several chunks (sharded DTensors) or stored
through a transform (compression) are described from the metadata alone, without data.

DCP writes every name separately and records no aliasing: a tied model saved with DCP shows
its tied names as untied duplicates with equal content.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch import _weights_only_unpickler
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.loaders.detect import DCP_METADATA
from tiecheck.loaders.fileview import FileSpan
from tiecheck.loaders.pickles import Global, describe, resolve
from tiecheck.loaders.subject import Source, Subject
from tiecheck.loaders.torchfile import pick_state, refused_global_message
from tiecheck.loaders.zipcheck import ZipArchive

METADATA = DCP_METADATA
# Sharded tensors (several chunks) are copied together for the content pass up to this many
# bytes in all; past it they are described from the metadata alone.
ASSEMBLE_BUDGET = 1 << 30
_INT64_MAX = (1 << 63) - 1

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's metadata is made of: refuses every other global, naming it."""

    def find_class(self, module: str, name: str):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)

        # find_class sees the names as written; protocol 2 writes Python 2 ones (commands.Popen).
        written = f"{module}.{name}"
        resolved = resolve(module, name)
        raise pickle.UnpicklingError(describe(Global(resolved, 0, written if written != resolved else "")))

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent id")


def read_metadata(path: Path):
    """DCP's Metadata for a checkpoint folder, read by FileSystemReader without running pickled code."""

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
                return _MetadataUnpickler(fh).load()

    meta_path = path / METADATA
    try:
        with _quiet_unraisable():
            md = SafeReader(os.fspath(path)).read_metadata()
    except pickle.UnpicklingError as e:
        raise TargetError(f"{meta_path}: refused to unpickle {e}: DCP metadata holds only checkpoint metadata "
                          f"classes, and unpickling anything else can run code") from e
    except Exception as e:  # noqa: BLE001 - the unpickler admits only metadata classes: any failure is the file's
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise TargetError(f"{meta_path}: not readable DCP metadata, truncated or corrupt "
                          f"({type(e).__name__}: {first})") from e
    check_metadata(md, meta_path)
    return md


@contextlib.contextmanager
def _quiet_unraisable():
    """Keep CPython's own reports about a damaged pickle off stderr: the C unpickler can free a
    bytearray while a buffer of it is exported, and CPython prints that SystemError through
    sys.excepthook (PyErr_Print) or sys.unraisablehook. The load then fails, in one line."""
    hooks = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = lambda _unraisable: None
    sys.excepthook = lambda *_exc: None
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = hooks


def _naturals(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def check_metadata(md: Any, where: Path) -> None:
    """Every field the loader uses, checked for type and range: the unpickler admits the metadata
    classes but not their contents (a class built without its state has no fields at all)."""

    def bad(what: str) -> TargetError:
        return TargetError(f"{where}: not valid DCP metadata: {what}")

    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise bad(f"holds a {type(md).__name__} without a state_dict_metadata mapping")
    for fqn, meta in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise bad(f"a key is a {type(fqn).__name__}, not a name")
        if isinstance(meta, BytesStorageMetadata):
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise bad(f"entry {fqn!r} is a {type(meta).__name__}")
        size, chunks = getattr(meta, "size", None), getattr(meta, "chunks", None)
        if not isinstance(getattr(getattr(meta, "properties", None), "dtype", None), torch.dtype):
            raise bad(f"entry {fqn!r} has no dtype")
        if not _naturals(size) or math_prod(size) * 16 > _INT64_MAX:
            raise bad(f"entry {fqn!r} has size {size!r}")
        if not isinstance(chunks, list) or not all(
                isinstance(c, ChunkStorageMetadata) and _naturals(getattr(c, "offsets", None))
                and _naturals(getattr(c, "sizes", None)) and len(c.offsets) == len(c.sizes) == len(size)
                for c in chunks):
            raise bad(f"entry {fqn!r} has malformed chunks")
    storage = getattr(md, "storage_data", None)
    if storage is not None and not isinstance(storage, dict):
        raise bad(f"storage_data is a {type(storage).__name__}")
    for index, info in (storage or {}).items():
        if not isinstance(index, MetadataIndex) or not isinstance(getattr(index, "fqn", None), str):
            raise bad("a storage_data key is not a MetadataIndex")
        if not isinstance(info, _StorageInfo) or not isinstance(getattr(info, "relative_path", None), str) \
                or not _naturals([getattr(info, "offset", None), getattr(info, "length", None)]):
            raise bad(f"the storage record of {index.fqn!r} is malformed")


class _Slice(io.RawIOBase):
    """A read-only window [start, start + length) of an open file, for zipfile."""

    def __init__(self, fh, start: int, length: int):
        self.fh, self.start, self.length, self.pos = fh, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, off: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + off))
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.fh.seek(self.start + self.pos)
        data = self.fh.read(n)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def _chunk_tensor(file: Path, storage, offset: int, length: int):
    """The tensor of one chunk (a torch.save archive inside the file), as a view of the mapping,
    and the file offset where the tensor's storage starts."""


    label = f"{file} (chunk at bytes {offset:,}-{offset + length:,})"
    with open(file, "rb") as fh, ZipArchive(_Slice(fh, offset, length), label) as za:
        pkl = [n for n in za.names() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError("no data.pkl")
        root = pkl[0].split("/")[0]
        pkl_span = za.span(pkl[0])
        data = za.read(pkl[0], limit=length)
        locations = {}
        for name in za.names():
            span = za.span(name) if name.startswith(f"{root}/data/") else None
            if span is not None:
                locations[name[len(root) + 6:]] = (offset + span[0], span[1])

    def persistent_load(pid):
        typename, storage_type, key, _location, numel = pid
        if typename != "storage" or key not in locations:
            raise ValueError(f"unknown storage {key!r}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        start, size = locations[key]
        nbytes = numel * torch._utils._element_size(dtype)
        if nbytes > size or start + nbytes > offset + length:
            raise ValueError("storage runs past its record")
        return torch.storage.TypedStorage(wrap_storage=storage[start:start + nbytes], dtype=dtype, _internal=True)

    starts: list[int] = []

    def remember(pid):
        st = persistent_load(pid)
        starts.append(locations[pid[2]][0])
        return st

    up = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    up.persistent_load = remember
    try:
        t = up.load()
    except pickle.UnpicklingError as e:
        base = offset + pkl_span[0] if pkl_span else 0
        named = refused_global_message(label, data, base, record="data.pkl")
        if named:
            raise UntrustedPickleError(named) from e
        raise
    if not isinstance(t, torch.Tensor) or len(starts) != 1:
        raise ValueError(f"holds a {type(t).__name__}, not one tensor")
    return t, starts[0]


def load_dcp(path: Path, *, key: str | None = None) -> Subject:
    md = read_metadata(path)
    storage_data = md.storage_data or {}
    by_fqn: dict[str, list] = {}
    for index, info in storage_data.items():
        by_fqn.setdefault(getattr(index, "fqn", None), []).append((index, info))

    files: dict[str, int] = {}
    for _, info in storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or len(Path(rel).parts) != 1:
            raise TargetError(f"{path / METADATA}: names data file {rel!r}, which lies outside the checkpoint folder")
        if rel not in files:
            p = path / rel
            if not p.is_file():
                raise TargetError(f"{path}: data file {rel} named by {METADATA} is missing (partial copy?); "
                                  f"copy the whole checkpoint folder and retry")
            files[rel] = p.stat().st_size
        end = info.offset + info.length
        if info.offset < 0 or end > files[rel]:
            raise TargetError(f"{path / rel}: {METADATA} places a chunk at bytes {info.offset:,}-{end:,} but the "
                              f"file holds {files[rel]:,}: it is truncated")


    storages: dict[str, Any] = {}
    spans: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    described = 0  # tensors without data (several chunks, or a transform)
    assembled, assembled_bytes = 0, 0  # sharded tensors copied together from their chunks
    failed: list[str] = []
    n_bytes = 0
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            n_bytes += 1
            flat[fqn] = None  # a pickled non-tensor entry: never unpickled here
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise TargetError(f"{path / METADATA}: entry {fqn!r} is a {type(meta).__name__}")
        size, dtype = tuple(int(n) for n in meta.size), meta.properties.dtype
        chunks = by_fqn.get(fqn, [])
        t = None
        whole = (len(meta.chunks) == 1 and len(chunks) == 1 and tuple(meta.chunks[0].sizes) == size
                 and not any(meta.chunks[0].offsets) and not getattr(chunks[0][1], "transform_descriptors", None))
        if whole and math_prod(size):
            info = chunks[0][1]
            rel = info.relative_path
            if rel not in storages:
                storages[rel] = torch.UntypedStorage.from_file(os.fspath(path / rel), False, files[rel])
            try:
                t, start = _chunk_tensor(path / rel, storages[rel], info.offset, info.length)
                spans[fqn] = FileSpan(os.fspath(path / rel), start)
                if tuple(t.shape) != size or t.dtype != dtype:
                    raise ValueError(f"chunk holds {list(t.shape)} {t.dtype}")
            except UntrustedPickleError:
                raise
            except Exception as e:  # noqa: BLE001 - describe from metadata, and say so
                failed.append(f"{fqn} ({type(e).__name__}: {e})")
                t = None
        nbytes = math_prod(size) * dtype.itemsize
        if (t is None and not whole and chunks and assembled_bytes + nbytes <= ASSEMBLE_BUDGET
                and not any(getattr(info, "transform_descriptors", None) for _, info in chunks)):
            try:
                t = _assembled(path, storages, files, chunks, size, dtype)
                assembled_bytes += nbytes
                assembled += 1
            except UntrustedPickleError:
                raise
            except Exception as e:  # noqa: BLE001 - describe from metadata, and say so
                failed.append(f"{fqn} ({type(e).__name__}: {e})")
                t = None
        if t is None:
            if not whole:
                described += 1
            t = torch.empty(size, dtype=dtype, device="meta")
        flat[fqn] = t

    if not any(v is not None for v in flat.values()):
        raise TargetError(f"{path}: the DCP checkpoint holds no tensors")
    nested = _nest(flat, getattr(md, "planner_data", None))
    tensors, used, notes = pick_state(nested, key, str(path))
    notes.insert(0, f"{sum(v is not None for v in flat.values())} tensors and {n_bytes} pickled entries in "
                    f"{len(files)} data file{'s' if len(files) != 1 else ''}; metadata read safely, tensor chunks "
                    f"memory-mapped; DCP records no aliasing, so tied names appear as separate copies")
    if assembled:
        notes.append(f"{assembled} tensor(s) saved in several chunks (sharded, one per rank) were copied together "
                     f"from their mapped chunks ({assembled_bytes:,} bytes in memory) for the content check")
    if described:
        notes.append(f"{described} tensor(s) are split into several chunks or transformed: described from the "
                     f"metadata, without data (no content check)")
    if failed:
        notes.append(f"{len(failed)} chunk(s) could not be mapped and are described from the metadata: {failed[0]}")
    fmt = "torch.distributed.checkpoint" + (" training checkpoint" if used else "")
    # Spans were found per DCP name; the picked names may differ (a 'model.' level, wrapper prefixes).
    span_of = {id(flat[fqn]): span for fqn, span in spans.items()}
    return Subject(tensors=tensors, source=Source(target=str(path), format=fmt, key=used, notes=notes),
                   extra={"files": [{"file": k, "bytes": v} for k, v in sorted(files.items())]},
                   file_spans={n: span_of[id(t)] for n, t in tensors.items() if id(t) in span_of})


def _assembled(path: Path, storages: dict[str, Any], files: dict[str, int], chunks: list, size: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    """A tensor saved in several chunks (a DTensor's shards, one per rank), copied together from them."""
    out = torch.empty(size, dtype=dtype)
    covered = 0
    for index, info in chunks:
        rel = info.relative_path
        if rel not in storages:
            storages[rel] = torch.UntypedStorage.from_file(os.fspath(path / rel), False, files[rel])
        t, _ = _chunk_tensor(path / rel, storages[rel], info.offset, info.length)
        offsets = tuple(int(o) for o in (getattr(index, "offset", None) or ()))
        if len(offsets) != len(size) or t.dtype != dtype:
            raise ValueError(f"chunk at {list(offsets)} holds {list(t.shape)} {t.dtype}")
        region = out[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))]
        if tuple(region.shape) != tuple(t.shape):
            raise ValueError(f"chunk at {list(offsets)} of shape {list(t.shape)} runs past {list(size)}")
        region.copy_(t)
        covered += t.numel()
    if covered != out.numel():
        raise ValueError(f"chunks cover {covered:,} of {out.numel():,} elements")
    return out


def math_prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _nest(flat: dict[str, Any], planner_data: Any) -> dict:
    """Rebuild the saved state dict's nesting from DCP's planner data (fqn -> key path)."""
    if not isinstance(planner_data, dict):
        return flat
    out: dict = {}
    for fqn, value in flat.items():
        keys = planner_data.get(fqn)
        if not isinstance(keys, tuple) or not keys:
            keys = (fqn,)
        cur = out
        for k in keys[:-1]:
            nxt = cur.setdefault(str(k), {})
            if not isinstance(nxt, dict):
                return flat  # a path collides with a value: keep the flat names
            cur = nxt
        cur[str(keys[-1])] = value
    return out
