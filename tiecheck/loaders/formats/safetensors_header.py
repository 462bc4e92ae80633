"""A safetensors header, read and checked: the records as columns (``Header``).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON describing
every tensor (dtype, shape, [begin, end) byte offsets into the data that follows), then the
data. The header is parsed here with the same rules the reference implementation enforces
(offsets contiguous from 0, sizes matching dtype × shape, data ending exactly at the end of
the file), so a truncated or corrupt file fails with one clear line before anything else.

The layout safetensors' writer emits is matched as text and checked on whole columns
(``_fast_columns``); any other header, and any header a rule refuses, is parsed as JSON and
checked record by record (``_checked_columns``), which says what is wrong.
"""

from __future__ import annotations

import json
import math
import operator
import re
from array import array
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tiecheck.errors import TargetError
from tiecheck.loaders.safejson import parse_json

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
    """One header record, as ``Header.entries`` hands it out (made on access: the header itself is
    kept as columns)."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int


class Kind(NamedTuple):
    """What the records of one (dtype, shape) share: one object for all of them."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    itemsize: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header, one column per field rather than an object per record: a million
    records as tuples held 150 MB; as columns, under 50 (``entries`` reads them as records)."""

    path: Path
    header_len: int
    names: list[str]  # in file order
    index: dict[str, int]  # name -> its position in the columns
    kinds: list[Kind]  # shared between the records of one dtype and shape
    begins: array  # int64 byte offsets relative to the start of the data section
    ends: array
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start

    @cached_property
    def entries(self) -> dict[str, Entry]:
        """name -> Entry, in file order: made on first use, for the writers that read records by name
        (``inspect`` reads the columns and never makes them)."""
        return {name: Entry(name, k.dtype, k.shape, begin, end)
                for name, k, begin, end in zip(self.names, self.kinds, self.begins, self.ends, strict=True)}

    def entry(self, i: int) -> Entry:
        """The record at position ``i``."""
        k = self.kinds[i]
        return Entry(self.names[i], k.dtype, k.shape, self.begins[i], self.ends[i])


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

    columns = _fast_columns(path, raw, size - 8 - n)
    if columns is None:  # anything but the plain layout safetensors writes: every rule, record by record
        columns = _checked_columns(path, raw, n, size)
    metadata, names, index, kinds, begins, ends = columns
    return Header(path=path, header_len=n, names=names, index=index, kinds=kinds, begins=begins, ends=ends,
                  metadata=metadata, file_size=size)


def _checked_columns(path: Path, raw: bytes, n: int, size: int) -> tuple:
    """The header parsed as JSON and checked record by record (``_entry``, ``_check_layout``): the
    reference for what is refused and how the refusal reads. Returns ``_columns``'s tuple."""
    try:
        obj = parse_json(raw, object_pairs_hook=_records)
    except ValueError as e:
        pos = getattr(e, "pos", None)  # a character index into the header; the file offset for ASCII
        where = f" near byte {8 + pos:,} of the file" if isinstance(pos, int) else ""
        raise _bad(path, f"the {n:,}-byte header is not valid JSON{where} ({e})") from e
    if not isinstance(obj, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = _metadata_of(path, obj.pop("__metadata__", None))
    shapes: dict[tuple[str, tuple], tuple[str, tuple[int, ...], int]] = {}
    entries = {name: _entry(path, name, spec, shapes) for name, spec in obj.items()}
    _check_layout(path, entries, size - 8 - n)
    kinds: dict[tuple[str, tuple[int, ...]], Kind] = {}
    for e in entries.values():
        if (e.dtype, e.shape) not in kinds:
            kinds[(e.dtype, e.shape)] = Kind(e.dtype, e.shape, e.end - e.begin, DTYPES[e.dtype][1])
    return (metadata, list(entries), {name: i for i, name in enumerate(entries)},
            [kinds[(e.dtype, e.shape)] for e in entries.values()],
            array("q", [e.begin for e in entries.values()]), array("q", [e.end for e in entries.values()]))


def _metadata_of(path: Path, metadata: Any) -> dict[str, str]:
    """``__metadata__`` as parsed (``_records``'s hook), as a dict of strings."""
    metadata = metadata or {}
    if type(metadata) is tuple:  # three string entries that look like a record: an object all the same
        metadata = dict(zip(("dtype", "shape", "data_offsets"), metadata, strict=True))
    if not isinstance(metadata, dict):
        raise _bad(path, "__metadata__ is not an object")
    return {str(k): str(v) for k, v in metadata.items()}


# The plain layout safetensors writes: no whitespace, each record's keys in the writer's order, names
# without escapes, integers without signs or leading zeros and of at most 18 digits (within int64). One
# match per record, from the separator before it; groups: separator, name, dtype and shape as text
# (their Kind is read once per distinct text), data offsets as text.
_NUMBER = r"(?:0|[1-9][0-9]{0,17})"
_RECORD = re.compile(r'([{,])"([^"\\\x00-\x1f]*)":\{"dtype":"([A-Z0-9_]+","shape":\[(?:' + _NUMBER + r"(?:,"
                     + _NUMBER + r')*)?)\],"data_offsets":\[(' + _NUMBER + "," + _NUMBER + r")\]\}")
_KIND_TEXT = '","shape":['  # between a kind's dtype and its shape in the matched text
_METADATA_START = '{"__metadata__":'
_FAST_CHUNK = 1 << 20  # characters of the header matched at once: the matches' strings are transient
_WHITESPACE = " \t\n\r"  # JSON's


def _fast_columns(path: Path, raw: bytes, data_bytes: int) -> tuple | None:
    """The header's columns read by one regular expression, or None to parse it record by record.

    Why not ``json``: a dict and two lists made per record, then each record checked in Python, took
    3.3 s of a million-record header; matched as text, with the checks made on whole columns, a
    third of that. Only the plain layout the writer emits is read here, and only when every rule
    holds: the records matched end to end tile the header (nothing but the records in the header, so
    nothing between them is skipped, and the text is then JSON that parses to exactly these
    records), no name twice, every dtype known and every shape's size within bounds, offsets that
    tile the data. Anything else, a refusal included, is None: ``_checked_columns`` then parses the
    header again and says what is wrong in the words it always has.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    end = len(text)
    while end and text[end - 1] in _WHITESPACE:  # the writer's padding: not rstrip, which copies the header
        end -= 1
    end -= 1  # the closing brace
    if end <= 0 or text[0] != "{" or text[end] != "}":
        return None
    metadata: dict[str, str] = {}
    pos = 0  # the records lie in [pos, end), each from its separator
    if text.startswith(_METADATA_START):
        try:
            meta, pos = json.JSONDecoder(object_pairs_hook=_records).raw_decode(text, len(_METADATA_START))
            metadata = _metadata_of(path, meta)
        except (ValueError, RecursionError, TargetError):
            return None
        if pos >= end or text[pos] != ",":
            return None
    first = text[pos]  # the first record's separator: "{", or "," after the metadata; every later one is ","
    braces = 0
    names: list[str] = []
    kinds: list[str] = []
    offsets: list[np.ndarray] = []
    while pos < end:
        # Cut after a record's closing brace: a cut a name fakes leaves a part that does not tile.
        cut = text.find('},"', min(pos + _FAST_CHUNK, end))
        cut = end if cut < 0 or cut >= end else cut + 1
        # split, not findall: the text between matches comes back too, and must be empty throughout
        # (the matches tile the part), with no tuple made per record.
        parts = _RECORD.split(text[pos:cut])
        if len(parts) < 6 or any(parts[0::5]):
            return None
        braces += parts[1::5].count("{")
        names += parts[2::5]
        kinds += parts[3::5]
        offsets.append(np.fromstring(",".join(parts[4::5]), dtype=np.int64, sep=","))
        pos = cut
    count = len(names)
    if braces != (first == "{"):
        return None
    index = dict(zip(names, range(count), strict=True))
    if len(index) != count or "__metadata__" in index:
        return None
    checked = _kinds(path, kinds)
    if checked is None:
        return None
    pairs = np.concatenate(offsets).reshape(count, 2)
    b, e = pairs[:, 0], pairs[:, 1]
    want = np.fromiter(map(operator.attrgetter("nbytes"), checked), dtype=np.int64, count=count)
    if not np.array_equal(e - b, want):
        return None
    order = np.lexsort((e, b))
    sb, se = b[order], e[order]
    if sb[0] != 0 or not np.array_equal(sb[1:], se[:-1]) or int(se[-1]) != data_bytes:
        return None
    begins, ends = array("q"), array("q")
    begins.frombytes(np.ascontiguousarray(b).tobytes())
    ends.frombytes(np.ascontiguousarray(e).tobytes())
    return metadata, names, index, checked, begins, ends


def _kinds(path: Path, texts: list[str]) -> list[Kind] | None:
    """The Kind of each record from its dtype and shape as matched (``F32","shape":[4,4``); None when
    a dtype is unknown or a shape's size is out of bounds (``_nbytes`` refuses it)."""
    known: dict[str, Kind] = {}
    for text in set(texts):
        code, _, dims = text.partition(_KIND_TEXT)
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        try:
            nbytes = _nbytes(path, "", code, list(shape))
        except TargetError:
            return None
        known[text] = Kind(code, shape, nbytes, DTYPES[code][1])
    return list(map(known.__getitem__, texts))


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
