"""``torch.distributed.checkpoint`` folders: ``.metadata`` plus ``*.distcp`` data files.

The metadata names every tensor with its global shape, dtype and chunks, and says which file
and byte range holds each chunk. DCP's own ``FileSystemReader.read_metadata`` calls
``pickle.load`` on it, which runs code from an untrusted checkpoint; and handing DCP's real
classes to the pickle lets its BUILD opcodes set attributes on them (a ``__setstate__`` set on
``Metadata`` by one file breaks every later DCP read in the process). So ``.metadata`` is read by
``pickleloop`` (protocol 4's data opcodes, with the loop's bounds), each DCP class it names made
an inert record (a name, arguments and a state, nothing else), and those records are then turned
into this module's own frozen descriptions, every field checked for type and range.

Each chunk in a ``.distcp`` file is a small ``torch.save`` archive. A chunk that covers its
whole tensor becomes a view into one memory mapping of the file (its pickle is read by the
weights-only unpickler; its bytes are mapped, not read), so nothing is loaded until the
content pass samples it. Tensors split across several chunks (sharded DTensors) or stored
through a transform (compression) are described from the metadata alone, without data. A chunk
whose tensor has more elements than its record stores bytes (a stride of 0 repeating one value)
is described from the metadata too: nothing copies or compares more than the files hold.

DCP writes every name separately and records no aliasing: a tied model saved with DCP shows
its tied names as untied duplicates with equal content.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import _weights_only_unpickler

from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.facts import Source
from tiecheck.loaders.detect import DCP_METADATA
from tiecheck.loaders.fileview import FileSpan
from tiecheck.loaders.formats.torchfile import pick_state, refused_global_message
from tiecheck.loaders.formats.torchzip import PickleRefusal, vet_archive
from tiecheck.loaders.pickleloop import DATA_OPCODES, Budget, Refused, Rules, check_containers, load
from tiecheck.loaders.pickles import Global, describe, resolve
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.zipcheck import ZipArchive

METADATA = DCP_METADATA
# Sharded tensors (several chunks) are copied together for the content pass up to this many
# bytes in all; past it they are described from the metadata alone.
ASSEMBLE_BUDGET = 1 << 30
_INT64_MAX = (1 << 63) - 1

_META = "torch.distributed.checkpoint.metadata"
_DCP_CLASSES = {
    _META: {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
}


# -- the pickle: inert records -------------------------------------------------------------------

class _Marker(str):
    """A global the metadata may name that is not a DCP class: what a call of it makes is decided here."""


_SIZE, _LAYOUT, _PATH, _ODICT, _SET, _FROZENSET = (_Marker(n) for n in ("torch.Size", "layout", "path",
                                                                        "OrderedDict", "set", "frozenset"))
_MARKERS = {("torch", "Size"): _SIZE, ("torch.serialization", "_get_layout"): _LAYOUT,
            ("collections", "OrderedDict"): _ODICT, ("builtins", "set"): _SET, ("builtins", "frozenset"): _FROZENSET,
            **{(m, n): _PATH for m in ("pathlib", "pathlib._local")
               for n in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")}}


class _InertClass(str):
    """A DCP class named by the metadata: its qualified name only."""


class _Inert:
    """An object of a DCP class as the pickle describes it: never an instance of the real class."""

    __slots__ = ("args", "cls", "state")

    def __init__(self, cls: str, args: tuple):
        self.cls, self.args, self.state = cls, args, None

    def __repr__(self) -> str:
        return f"<{self.cls.rsplit('.', 1)[-1]}>"


def _children(x: Any) -> Any:
    return (x.args, x.state) if type(x) is _Inert else None


class _MetadataRules(Rules):
    """What DCP's metadata is made of; every other global is refused by name."""

    opcodes = DATA_OPCODES

    def global_(self, module: str, name: str, offset: int) -> Any:
        marker = _MARKERS.get((module, name))
        if marker is not None:
            return marker
        if module == "torch":
            dtype = vars(torch).get(name)  # not getattr: torch imports some submodules lazily by name
            if isinstance(dtype, torch.dtype):
                return dtype
        if name in _DCP_CLASSES.get(module, ()):
            return _InertClass(f"{module}.{name}")
        # The names as written; protocol 2 writes Python 2 ones (commands.Popen).
        written, resolved = f"{module}.{name}", resolve(module, name)
        raise Refused(describe(Global(resolved, offset, written if written != resolved else "")), offset,
                      untrusted=True)

    def call(self, func: Any, args: tuple, offset: int) -> Any:
        if type(func) is _InertClass:
            return _Inert(func, args)
        if func is _SIZE and len(args) == 1 and type(args[0]) is tuple:
            return args[0]
        if func is _ODICT and not args:
            return {}
        if (func is _LAYOUT or func is _PATH) and all(type(a) is str for a in args):
            return args[0] if func is _LAYOUT and len(args) == 1 else str(PurePosixPath(*args))
        if (func is _SET or func is _FROZENSET) and len(args) <= 1:
            items = list(args[0]) if args and type(args[0]) in (list, tuple) else []
            for k in items:
                if type(k) not in (str, int):
                    raise Refused(f"puts a {type(k).__name__} in a set", offset)
            return set(items) if func is _SET else frozenset(items)
        raise Refused(f"calls {func!r} with arguments of the wrong kind", offset)

    def new(self, cls: Any, args: tuple, offset: int) -> Any:
        if type(cls) is _InertClass:
            return _Inert(cls, args)
        raise Refused(f"makes an object of {cls!r}, which DCP metadata never holds", offset)

    def build(self, inst: Any, state: Any, offset: int) -> None:
        if type(inst) is _Inert and inst.state is None:
            inst.state = state
            return
        raise Refused(f"sets the state of {inst!r}, which DCP metadata never does", offset)

    def key_ok(self, key: Any) -> bool:
        return type(key) is _Inert  # hashed by identity: a file cannot choose collisions


# -- the records, checked, as this module's own descriptions -------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Where one chunk of a tensor sits in the global tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class StoredItem:
    """One item of ``storage_data``: which chunk of which name, and where its bytes are."""

    fqn: str
    offset: tuple[int, ...] | None  # the chunk's offsets in the global tensor
    relative_path: str
    file_offset: int
    length: int
    transformed: bool  # stored through transforms (compression): not read


@dataclass(frozen=True)
class DcpMetadata:
    entries: dict[str, TensorEntry | None]  # None: a pickled (bytes) entry, never unpickled here
    items: tuple[StoredItem, ...]
    planner_data: dict[str, tuple] | None


def _naturals(v: Any) -> bool:
    return type(v) is tuple and all(type(x) is int and 0 <= x <= _INT64_MAX for x in v)


def _fields(x: Any, cls: str, where: str) -> dict:
    """The state of an inert record of DCP class ``cls`` (a dataclass pickles its fields as a dict)."""
    if type(x) is not _Inert or x.cls.rsplit(".", 1)[-1] != cls or type(x.state) is not dict:
        raise ValueError(f"{where} is {x!r}, not a {cls} record with its fields")
    return x.state


def _dtype_of(props: Any, where: str) -> torch.dtype:
    """TensorProperties: DCP pickles (dtype, layout, requires_grad, memory format, pin_memory)."""
    if type(props) is not _Inert or not props.cls.endswith(".TensorProperties"):
        raise ValueError(f"{where} has no TensorProperties record")
    state = props.state
    dtype = state[0] if type(state) is tuple and state else state.get("dtype") if type(state) is dict else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where} has no dtype")
    return dtype


def _entry(fqn: str, meta: Any) -> TensorEntry | None:
    where = f"entry {fqn!r}"
    if type(meta) is _Inert and meta.cls.endswith(".BytesStorageMetadata"):
        return None
    f = _fields(meta, "TensorStorageMetadata", where)
    size, chunks = f.get("size"), f.get("chunks")
    if not _naturals(size) or math_prod(size) * 16 > _INT64_MAX:
        raise ValueError(f"{where} has size {size!r}")
    if type(chunks) is not list:
        raise ValueError(f"{where} has malformed chunks")
    out = []
    for c in chunks:
        cf = _fields(c, "ChunkStorageMetadata", f"a chunk of {where}")
        offsets, sizes = cf.get("offsets"), cf.get("sizes")
        if not _naturals(offsets) or not _naturals(sizes) or not len(offsets) == len(sizes) == len(size):
            raise ValueError(f"{where} has malformed chunks")
        out.append(Chunk(offsets, sizes))
    return TensorEntry(_dtype_of(f.get("properties"), where), size, tuple(out))


def _item(index: Any, info: Any) -> StoredItem:
    fi = _fields(index, "MetadataIndex", "a storage_data key")
    fqn, offset = fi.get("fqn"), fi.get("offset")
    if type(fqn) is not str or not (offset is None or _naturals(offset)):
        raise ValueError("a storage_data key is not a MetadataIndex")
    fs = _fields(info, "_StorageInfo", f"the storage record of {fqn!r}")
    rel, start, length = fs.get("relative_path"), fs.get("offset"), fs.get("length")
    if type(rel) is not str or not _naturals((start, length)):
        raise ValueError(f"the storage record of {fqn!r} is malformed")
    return StoredItem(fqn, offset, rel, start, length, bool(fs.get("transform_descriptors")))


def metadata_from(obj: Any) -> DcpMetadata:
    """The checked description of an unpickled ``.metadata``.

    Raises:
        ValueError: a record of the wrong class, a field of the wrong type or out of range.
    """
    f = _fields(obj, "Metadata", "the pickle")
    sdm, storage, planner = f.get("state_dict_metadata"), f.get("storage_data"), f.get("planner_data")
    if type(sdm) is not dict:
        raise ValueError("holds a Metadata without a state_dict_metadata mapping")
    entries = {}
    for fqn, meta in sdm.items():
        if type(fqn) is not str:
            raise ValueError(f"a key is a {type(fqn).__name__}, not a name")
        entries[fqn] = _entry(fqn, meta)
    if storage is not None and type(storage) is not dict:
        raise ValueError(f"storage_data is a {type(storage).__name__}")
    items = tuple(_item(k, v) for k, v in (storage or {}).items())
    plan = None
    if type(planner) is dict:
        plan = {k: v for k, v in planner.items()
                if type(k) is str and type(v) is tuple and all(type(p) in (str, int) for p in v)}
    return DcpMetadata(entries, items, plan)


def read_metadata(path: Path) -> DcpMetadata:
    """A checkpoint folder's metadata, read without running or building anything the pickle names.

    Raises:
        TargetError: a refused global (named), a broken bound, or malformed metadata.
    """
    meta_path = path / METADATA
    try:
        data = meta_path.read_bytes()
    except OSError as e:
        raise TargetError(f"{meta_path}: cannot read ({e.strerror or e})") from e
    try:
        obj, _ = load(data, _MetadataRules(), Budget(len(data)))
        check_containers(obj, _children)
    except Refused as e:
        if e.untrusted and not e.why.startswith("uses"):
            raise TargetError(f"{meta_path}: refused to unpickle {e.why}: DCP metadata holds only checkpoint "
                              f"metadata classes, and unpickling anything else can run code") from e
        raise TargetError(f"{meta_path}: not readable DCP metadata: the pickle {e.why} (byte {e.offset:,})") from e
    try:
        return metadata_from(obj)
    except ValueError as e:
        raise TargetError(f"{meta_path}: not valid DCP metadata: {e}") from e


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
    and the file offset where the tensor's storage starts.

    Raises:
        UntrustedPickleError: the chunk's pickle names a refused global.
        TargetError: its pickle breaks a bound of ``pickleloop``.
        ValueError: anything else about the chunk (it is then described from the metadata).
    """
    label = f"{file} (chunk at bytes {offset:,}-{offset + length:,})"
    with open(file, "rb") as fh, ZipArchive(_Slice(fh, offset, length), label) as za:
        pkl = [n for n in za.names() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError("no data.pkl")
        vet_archive(za, trusted=False)  # the loop's bounds before torch's unpickler keeps whatever the pickle asks for
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
    stored = t.untyped_storage().nbytes()
    if t.numel() * t.element_size() > stored:
        raise ValueError(f"a view of {t.numel():,} elements over {stored:,} stored bytes (a stride of 0 repeats "
                         f"them): not copied or compared")
    return t, starts[0]


def _data_files(path: Path, md: DcpMetadata) -> dict[str, int]:
    """Size of every data file the metadata names, each checked to lie in the folder and to hold its chunks."""
    files: dict[str, int] = {}
    for item in md.items:
        rel = item.relative_path
        if not rel or Path(rel).is_absolute() or len(Path(rel).parts) != 1 or rel in (".", ".."):
            raise TargetError(f"{path / METADATA}: names data file {rel!r}, which lies outside the checkpoint folder")
        if rel not in files:
            p = path / rel
            if not p.is_file():
                raise TargetError(f"{path}: data file {rel} named by {METADATA} is missing (partial copy?); "
                                  f"copy the whole checkpoint folder and retry")
            files[rel] = p.stat().st_size
        end = item.file_offset + item.length
        if end > files[rel]:
            raise TargetError(f"{path / rel}: {METADATA} places a chunk at bytes {item.file_offset:,}-{end:,} but the "
                              f"file holds {files[rel]:,}: it is truncated")
    return files


def load_dcp(path: Path, *, key: str | None = None) -> Subject:
    md = read_metadata(path)
    by_fqn: dict[str, list[StoredItem]] = {}
    for item in md.items:
        by_fqn.setdefault(item.fqn, []).append(item)
    files = _data_files(path, md)

    storages: dict[str, Any] = {}
    spans: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    described = 0  # tensors without data (several chunks, or a transform)
    assembled, assembled_bytes = 0, 0  # sharded tensors copied together from their chunks
    failed: list[str] = []
    n_bytes = 0
    for fqn, meta in md.entries.items():
        if meta is None:
            n_bytes += 1
            flat[fqn] = None  # a pickled non-tensor entry: never unpickled here
            continue
        size, dtype = meta.size, meta.dtype
        chunks = by_fqn.get(fqn, [])
        t = None
        whole = (len(meta.chunks) == 1 and len(chunks) == 1 and meta.chunks[0].sizes == size
                 and not any(meta.chunks[0].offsets) and not chunks[0].transformed)
        if whole and math_prod(size):
            item = chunks[0]
            rel = item.relative_path
            if rel not in storages:
                storages[rel] = torch.UntypedStorage.from_file(os.fspath(path / rel), False, files[rel])
            try:
                t, start = _chunk_tensor(path / rel, storages[rel], item.file_offset, item.length)
                spans[fqn] = FileSpan(os.fspath(path / rel), start)
                if tuple(t.shape) != size or t.dtype != dtype:
                    raise ValueError(f"chunk holds {list(t.shape)} {t.dtype}")
            except (UntrustedPickleError, PickleRefusal):
                raise
            except Exception as e:  # noqa: BLE001 - describe from metadata, and say so
                failed.append(f"{fqn} ({type(e).__name__}: {e})")
                t = None
        nbytes = math_prod(size) * dtype.itemsize
        # Only what the chunks' records can hold is assembled: a copy never outgrows the files.
        if (t is None and not whole and chunks and assembled_bytes + nbytes <= ASSEMBLE_BUDGET
                and sum(item.length for item in chunks) >= nbytes and not any(i.transformed for i in chunks)):
            try:
                t = _assembled(path, storages, files, chunks, size, dtype)
                assembled_bytes += nbytes
                assembled += 1
            except (UntrustedPickleError, PickleRefusal):
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
    nested = _nest(flat, md.planner_data)
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


def _assembled(path: Path, storages: dict[str, Any], files: dict[str, int], chunks: list[StoredItem],
               size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor saved in several chunks (a DTensor's shards, one per rank), copied together from them."""
    out = torch.empty(size, dtype=dtype)
    covered = 0
    for item in chunks:
        rel = item.relative_path
        if rel not in storages:
            storages[rel] = torch.UntypedStorage.from_file(os.fspath(path / rel), False, files[rel])
        t, _ = _chunk_tensor(path / rel, storages[rel], item.file_offset, item.length)
        offsets = item.offset or ()
        if len(offsets) != len(size) or t.dtype != dtype:
            raise ValueError(f"chunk at {list(offsets)} holds {list(t.shape)} {t.dtype}")
        region = out[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape, strict=True))]
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


def _nest(flat: dict[str, Any], planner_data: dict[str, tuple] | None) -> dict:
    """Rebuild the saved state dict's nesting from DCP's planner data (fqn -> key path)."""
    if not planner_data:
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
