"""``.safetensors`` files, single or sharded by a ``*.index.json``.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON describing
every tensor (dtype, shape, [begin, end) byte offsets into the data that follows), then the
data. The header is parsed here with the same rules the reference implementation enforces
(offsets contiguous from 0, sizes matching dtype × shape, data ending exactly at the end of
the file), so a truncated or corrupt file fails with one clear line before anything else.

Tensor data is never read here: each file is memory-mapped once and every tensor is a view
into the mapping, so building the Subject touches only the header pages. The content pass
(``content.py``) later reads the few pages it samples. Safetensors cannot store aliased
tensors; a file alone shows a tie only where ``__metadata__`` records a dropped name as an alias
of a stored one (``safetensors.torch.save_model``), and otherwise ties come from the
architecture (``hf.py``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tiecheck.errors import TargetError
from tiecheck.facts import Source, TensorFact
from tiecheck.findings import finding
from tiecheck.loaders.declared import alias_declarations, alias_map
from tiecheck.loaders.fileview import FileSpan
from tiecheck.loaders.safejson import parse_json
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import fact_of

# The reference implementation refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER = 100_000_000
MAX_BYTES = (1 << 63) - 1  # tensor sizes beyond int64 overflow torch's storage arithmetic

# safetensors dtype names -> (torch dtype attribute, bytes per element).
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1), "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
}


class Entry(NamedTuple):
    """One header record. A named tuple: a header of 100,000 tensors makes 100,000 of them, and a
    tuple is built several times faster than a frozen dataclass."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    header_len: int
    entries: dict[str, Entry]  # in file order
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def _bad(path: Path | str, why: str) -> TargetError:
    return TargetError(f"{path}: not a valid safetensors file: {why}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` that refuses a key given twice (``json`` would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _records(pairs: list[tuple[str, Any]]) -> Any:
    """``object_pairs_hook`` of a header: a tensor record with the three keys in the order safetensors
    writes them becomes a (dtype, shape, data_offsets) tuple, which JSON never yields otherwise, so
    a million records are not built as dicts and read back by key; any other object is a dict,
    refused when a key repeats (``_no_duplicates``)."""
    if len(pairs) == 3:
        (k0, dtype), (k1, shape), (k2, offsets) = pairs
        if k0 == "dtype" and k1 == "shape" and k2 == "data_offsets":
            return dtype, shape, offsets
    return _no_duplicates(pairs)


def header_length(path: Path | str, first: bytes, size: int) -> int:
    """The header length N that a file's first 8 bytes declare, checked before N bytes are read.

    Shared by every reader of a header (local files, and remote ones read by range), so a length
    that lies is refused with the same line wherever the file is.

    Args:
        path: how errors name the file.
        first: the file's first 8 bytes.
        size: the file's size in bytes.

    Returns:
        N, at most ``MAX_HEADER`` and within the file.

    Raises:
        TargetError: the length exceeds the limit or the file.
    """
    n = int.from_bytes(first[:8], "little")
    if n > MAX_HEADER:
        raise _bad(path, f"header length {n:,} bytes exceeds the {MAX_HEADER:,}-byte limit; the first 8 "
                         f"bytes are corrupt or this is not safetensors")
    if 8 + n > size:
        raise _bad(path, f"header length {n:,} bytes exceeds the file size ({size:,} bytes): the file is "
                         f"truncated or corrupt; download or copy it again")
    return n


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; reads 8 + N bytes, never the tensor data."""
    try:
        size = path.stat().st_size
        # Unbuffered: a buffered read of the 8-byte length would pull in the data after the header.
        with open(path, "rb", buffering=0) as fh:
            first = fh.read(8)
            if len(first) < 8:
                raise _bad(path, f"{size} bytes is too short to hold the 8-byte header length")
            n = header_length(path, first, size)
            raw = b""
            while len(raw) < n:  # an unbuffered read may return less than asked
                more = fh.read(n - len(raw))
                if not more:
                    raise _bad(path, "the file ended inside the header")
                raw += more
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e.strerror or e})") from e

    try:
        obj = parse_json(raw, object_pairs_hook=_records)
    except ValueError as e:
        pos = getattr(e, "pos", None)  # a character index into the header; the file offset for ASCII
        where = f" near byte {8 + pos:,} of the file" if isinstance(pos, int) else ""
        raise _bad(path, f"the {n:,}-byte header is not valid JSON{where} ({e})") from e
    if not isinstance(obj, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if type(metadata) is tuple:  # three string entries that look like a record: an object all the same
        metadata = dict(zip(("dtype", "shape", "data_offsets"), metadata, strict=True))
    if not isinstance(metadata, dict):
        raise _bad(path, "__metadata__ is not an object")
    shapes: dict[tuple[str, tuple], tuple[str, tuple[int, ...], int]] = {}
    entries = {name: _entry(path, name, spec, shapes) for name, spec in obj.items()}
    _check_layout(path, entries, size - 8 - n)
    return Header(path=path, header_len=n, entries=entries, metadata={str(k): str(v) for k, v in metadata.items()},
                  file_size=size)


def _naturals(v: Any) -> bool:
    """A JSON list of non-negative integers (``bool`` is not an integer here)."""
    return type(v) is list and all(type(x) is int for x in v) and (not v or min(v) >= 0)


def _entry(path: Path, name: str, spec: Any,
           shapes: dict[tuple[str, tuple], tuple[str, tuple[int, ...], int]]) -> Entry:
    """One record, checked. ``shapes`` caches (dtype, shape) -> (dtype, shape, byte size) across the
    header's records: a checkpoint repeats a few shapes many times, each is checked once, and its
    records share one dtype string and one shape tuple (90,000 records: 9 MB fewer objects)."""
    if type(spec) is tuple:  # a record as _records made it
        dtype, shape, offsets = spec
    elif isinstance(spec, dict):
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    else:
        raise _bad(path, f"tensor {name!r} is described by a {type(spec).__name__}, not an object")
    known = None
    if type(shape) is list:
        # try, not contextlib.suppress: entering a context manager a million times shows
        try:
            known = shapes.get((dtype, tuple(shape)))
        except TypeError:
            known = None  # a list or object where a string or an integer belongs: _nbytes says which
    if known is None:
        want = _nbytes(path, name, dtype, shape)  # first: it refuses what a cache key cannot hold
        key = (dtype, tuple(shape))
        known = shapes[key] = (*key, want)
    dtype, shape, want = known
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or \
            type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1]:
        raise _bad(path, f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with begin <= end")
    begin, end = offsets
    if end - begin != want:
        raise _bad(path, f"tensor {name!r} ({dtype} {shape}) needs {want:,} bytes but its data_offsets span "
                         f"{end - begin:,}")
    return Entry(name, dtype, shape, begin, end)


def _nbytes(path: Path, name: str, dtype: Any, shape: Any) -> int:
    """Bytes a tensor of this dtype and shape takes, or the line that says why the record is invalid."""
    kind = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if kind is None:
        known = ", ".join(DTYPES)
        raise _bad(path, f"tensor {name!r} has dtype {dtype!r}, which tiecheck cannot represent (known: {known})")
    if not _naturals(shape):
        raise _bad(path, f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    # As the reference implementation's checked multiplication: a shape whose running product
    # overflows 64 bits is refused, even when a later 0 would make it empty. Zeros count as 1 in
    # that product, so it never decreases and checking its final value checks every step.
    nonzero = math.prod(d for d in shape if d)
    if nonzero * kind[1] > MAX_BYTES:
        raise _bad(path, f"tensor {name!r} has shape {shape}: more bytes than any file can hold")
    return nonzero * kind[1] if 0 not in shape else 0


def _check_layout(path: Path, entries: dict[str, Entry], data_bytes: int) -> None:
    """Offsets must tile the data section exactly: no gaps, no overlaps, nothing past the end."""
    pos = 0
    for e in sorted(entries.values(), key=operator.attrgetter("begin", "end")):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else f"leaves a gap of {e.begin - pos:,} bytes"
            raise _bad(path, f"tensor {e.name!r} starts at data offset {e.begin:,}, which {what}")
        pos = e.end
    if pos > data_bytes:
        raise _bad(path, f"the header describes {pos:,} bytes of tensor data but the file holds {data_bytes:,}: "
                         f"the file is truncated; download or copy it again")
    if pos < data_bytes:
        raise _bad(path, f"the file holds {data_bytes - pos:,} bytes after the last tensor's data")


class MappedTensors(Mapping):
    """Every tensor of one safetensors file as a view into one read-only mapping of the file.

    The views are made on access, not up front: a checkpoint of 100,000 tensors would otherwise
    spend seconds and a hundred megabytes on tensor objects that only their header fields are
    needed from. ``facts()`` describes every tensor from the header alone, exactly as
    ``tiecheck.loaders.tensor_facts.fact_of`` would describe the view.
    """

    def __init__(self, header: Header, storage: Any, copied: dict[str, Any]):
        self._header = header
        self._data_start = header.data_start  # read once a tensor by file_layout
        self._storage = storage
        self._copied = copied  # unaligned tensors, copied into memory by map_tensors
        self._aliases: dict[str, str] = {}  # a name the file dropped -> the stored name it is one tensor with

    def add_alias(self, name: str, stored: str) -> None:
        """``name`` is one tensor with the stored ``stored`` (a tie an alias map restores)."""
        self._aliases[name] = stored

    def __getitem__(self, name: str):
        name = self._aliases.get(name, name)
        if name in self._copied:
            return self._copied[name]
        e = self._header.entries[name]  # KeyError for an unknown name, as a dict
        dtype = getattr(torch, DTYPES[e.dtype][0])
        if e.end == e.begin or self._storage is None:
            return torch.empty(e.shape, dtype=dtype)
        start = self._header.data_start + e.begin
        return torch.empty(0, dtype=dtype).set_(self._storage, start // DTYPES[e.dtype][1], e.shape)

    def __iter__(self):
        yield from self._header.entries
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._header.entries) + len(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._header.entries or name in self._aliases

    def file_layout(self, name: str) -> tuple[int, int, int]:
        """(offset of the first byte in the mapping, nbytes, itemsize) of a mapped tensor, for pread."""
        e = self._header.entries[self._aliases.get(name, name) if self._aliases else name]
        return self._data_start + e.begin, e.end - e.begin, DTYPES[e.dtype][1]

    def facts(self) -> list:
        """A TensorFact per tensor, in file order, read from the header (no tensor is made)."""
        ptr = self._storage.data_ptr() if self._storage is not None else 0
        kinds = {}
        for code, (attr, _size) in DTYPES.items():
            dt = getattr(torch, attr, None)
            if dt is not None:
                kinds[code] = (attr, dt.is_floating_point or dt.is_complex)
        out = []
        storage = ("cpu", ptr)  # one key object shared by every fact, and strides shared per shape
        strides: dict[tuple[int, ...], tuple[int, ...]] = {}
        copied, data_start, file_size = self._copied, self._header.data_start, self._header.file_size
        fact = TensorFact
        for name, (_, code, shape, begin, end) in self._header.entries.items():
            if copied and name in copied:
                out.append(fact_of(name, copied[name]))
                continue
            dtype, floating = kinds[code]
            stride = strides.get(shape)
            if stride is None:
                stride = strides[shape] = tuple(_contiguous_strides(shape))
            # Positional, in TensorFact's field order: keywords cost a third more at a million facts.
            # (name, shape, stride, dtype, itemsize, device, storage, byte_start, byte_end, obj_id, role,
            #  owner, owner_type, requires_grad, is_floating, storage_bytes)
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if ptr and end > begin:
                start = data_start + begin
                out.append(fact(name, shape, stride, dtype, DTYPES[code][1], "cpu", storage, start, start + end - begin,
                                None, "tensor", owner, None, False, floating, file_size))
            else:
                out.append(fact(name, shape, stride, dtype, DTYPES[code][1], "cpu", None, 0, 0,
                                None, "tensor", owner, None, False, floating, 0))
        if self._aliases:  # an alias is the stored tensor's fact under its own name: the same extent
            by_name = {f.name: f for f in out}
            out += [dataclasses.replace(by_name[stored], name=name,
                                        owner=name.rsplit(".", 1)[0] if "." in name else "")
                    for name, stored in self._aliases.items()]
        return out


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return strides[::-1]


class FileSpans(MutableMapping):
    """name -> the one ``FileSpan`` of a file, for every tensor its header stores with data in place
    (not the empty ones, not those copied into memory), plus the names set later (restored aliases).

    What a dict of them would say, without the dict: a million names all holding the same span
    cost 40 MB and a second of inserts.
    """

    def __init__(self, span: FileSpan, entries: Mapping[str, Entry], copied: Mapping[str, Any], count: int):
        self._span, self._entries, self._copied, self._count = span, entries, copied, count
        self._extra: dict[str, Any] = {}

    def _stored(self, name: object) -> bool:
        e = self._entries.get(name)  # type: ignore[call-overload]
        return e is not None and e.end > e.begin and name not in self._copied

    def get(self, name: str, default: Any = None) -> Any:
        if self._extra and name in self._extra:
            return self._extra[name]
        e = self._entries.get(name)  # _stored, inlined: the content pass asks once a tensor
        return self._span if e is not None and e.end > e.begin and name not in self._copied else default

    def __getitem__(self, name: str) -> Any:
        got = self.get(name, self)
        if got is self:
            raise KeyError(name)
        return got

    def __setitem__(self, name: str, span: Any) -> None:
        self._extra[name] = span

    def __delitem__(self, name: str) -> None:
        del self._extra[name]  # the header's own names stay: they are the file

    def __contains__(self, name: object) -> bool:
        return name in self._extra or self._stored(name)

    def __iter__(self):
        for name, e in self._entries.items():
            if e.end > e.begin and name not in self._copied and name not in self._extra:
                yield name
        yield from self._extra

    def __len__(self) -> int:
        return self._count + sum(1 for n in self._extra if not self._stored(n))


def map_tensors(header: Header) -> tuple[MappedTensors, list[str], Mapping[str, Any]]:
    """Every tensor as a view into one read-only memory mapping of the file (no data is read).

    Returns the tensors (made on access), notes, and their file spans (the mapping starts at
    file offset 0), so the content pass reads them with pread instead of faulting pages in.
    """
    notes: list[str] = []
    storage = None
    if header.data_bytes:
        try:
            storage = torch.UntypedStorage.from_file(os.fspath(header.path), False, header.file_size)
        except RuntimeError as e:
            raise TargetError(f"{header.path}: cannot memory-map the file ({e})") from e
    copied: dict[str, Any] = {}
    span = FileSpan(os.fspath(header.path), 0)  # one span serves every tensor of the file
    data_start = header.data_start
    itemsizes: dict[str, int] = {}  # each dtype the file uses, checked once (not once per tensor)
    mapped = 0
    for e in header.entries.values():
        itemsize = itemsizes.get(e.dtype)
        if itemsize is None:
            if getattr(torch, DTYPES[e.dtype][0], None) is None:
                raise TargetError(f"{header.path}: tensor {e.name!r} has dtype {e.dtype}, which this torch "
                                  f"{torch.__version__} does not support; upgrade torch")
            itemsize = itemsizes[e.dtype] = DTYPES[e.dtype][1]
        start = data_start + e.begin
        if e.end == e.begin or storage is None:
            continue
        if start % itemsize == 0:
            mapped += 1
        else:
            # A hand-made header whose length is not a multiple of the element size: a typed view
            # cannot start there, so this tensor (only) is copied into memory.
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, start, (e.end - e.begin,))
            copied[e.name] = raw.clone().view(getattr(torch, DTYPES[e.dtype][0])).reshape(e.shape)
    if copied:
        notes.append(f"{len(copied)} tensor(s) start at unaligned offsets and were copied into memory "
                     f"(e.g. {next(iter(copied))})")
    spans: Mapping[str, Any] = FileSpans(span, header.entries, copied, mapped) if storage is not None else {}
    return MappedTensors(header, storage, copied), notes, spans


def file_summary(header: Header) -> dict[str, Any]:
    return {"file": header.path.name, "tensors": len(header.entries), "bytes": header.file_size,
            "header_bytes": header.data_start}


def load_safetensors_file(path: Path, *, restore_aliases: bool = True) -> Subject:
    """One safetensors file; names its ``__metadata__`` records as aliases of a stored tensor
    (``safetensors.torch.save_model``) are restored as ties unless ``restore_aliases`` is False
    (a Hugging Face folder, whose architecture re-ties instead)."""
    header = read_header(path)
    tensors, notes, spans = map_tensors(header)
    aliases, broken = alias_map(header.metadata, set(header.entries))
    decls, pairs = alias_declarations(aliases, broken, path.name)
    if aliases or broken:
        how = (f"__metadata__ records {len(aliases)} dropped name{'s' if len(aliases) != 1 else ''} as "
               f"alias{'es' if len(aliases) != 1 else ''} of stored tensors (safetensors.torch.save_model)")
        notes.insert(0, f"{len(header.entries)} tensors, {header.data_bytes:,} bytes of data; header read, data "
                        f"memory-mapped; {how}" + ("; restored as ties" if restore_aliases and aliases else ""))
    else:
        notes.insert(0, f"{len(header.entries)} tensors, {header.data_bytes:,} bytes of data; header read, data "
                        f"memory-mapped (no alias map in __metadata__: ties come from the architecture)")
    findings = [finding("TC020", f"{path.name} __metadata__ says {k} is an alias of {v}, but the file holds no {v}: "
                                 f"a loader that restores aliases cannot restore {k}", [k, v])
                for k, v in sorted(broken.items())]
    stored_copies = None
    if restore_aliases and aliases:
        stored_copies = {n: ("file", path.name, n) for n in header.entries}
        for dropped, kept in aliases.items():
            if dropped in tensors:
                continue  # stored as well: the layers analysis compares the two copies
            tensors.add_alias(dropped, kept)
            stored_copies[dropped] = None
            if kept in spans:
                spans[dropped] = spans[kept]
    return Subject(tensors=tensors, source=Source(target=str(path), format="safetensors", notes=notes),
                   extra={"files": [file_summary(header)]}, file_spans=spans, loader_findings=findings,
                   declarations=decls, declared_pairs=pairs, stored_copies=stored_copies)


