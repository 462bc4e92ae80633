"""``.safetensors`` files, single or sharded by a ``*.index.json``.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON describing
every tensor, then the data. The header is read and checked by ``safetensors_header.py``
with the rules the reference implementation enforces, so a truncated or corrupt file fails
with one clear line before anything else.

Tensor data is never read here: each file is memory-mapped once and every tensor is a view
into the mapping, so building the Subject touches only the header pages. The content pass
(``content.py``) later reads the few pages it samples. Safetensors cannot store aliased
tensors; a file alone shows a tie only where ``__metadata__`` records a dropped name as an alias
of a stored one (``safetensors.torch.save_model``), and otherwise ties come from the
architecture (``hf.py``).
"""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiecheck.errors import TargetError
from tiecheck.facts import Source, TensorFact
from tiecheck.findings import finding
from tiecheck.loaders.declared import alias_declarations, alias_map
from tiecheck.loaders.fileview import FileSpan
from tiecheck.loaders.formats.safetensors_header import DTYPES, Header, read_header
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import fact_of


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
        h = self._header
        i = h.index[name]  # KeyError for an unknown name, as a dict
        kind = h.kinds[i]
        dtype = getattr(torch, DTYPES[kind.dtype][0])
        if h.ends[i] == h.begins[i] or self._storage is None:
            return torch.empty(kind.shape, dtype=dtype)
        start = h.data_start + h.begins[i]
        return torch.empty(0, dtype=dtype).set_(self._storage, start // kind.itemsize, kind.shape)

    def __iter__(self):
        yield from self._header.names
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._header.names) + len(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._header.index or name in self._aliases

    def file_layout(self, name: str) -> tuple[int, int, int]:
        """(offset of the first byte in the mapping, nbytes, itemsize) of a mapped tensor, for pread."""
        h = self._header
        i = h.index[self._aliases.get(name, name) if self._aliases else name]
        begin = h.begins[i]
        return self._data_start + begin, h.ends[i] - begin, h.kinds[i].itemsize

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
        h = self._header
        for name, (code, shape, _, itemsize), begin, end in zip(h.names, h.kinds, h.begins, h.ends, strict=True):
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
                out.append(fact(name, shape, stride, dtype, itemsize, "cpu", storage, start, start + end - begin,
                                None, "tensor", owner, None, False, floating, file_size))
            else:
                out.append(fact(name, shape, stride, dtype, itemsize, "cpu", None, 0, 0,
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

    def __init__(self, span: FileSpan, header: Header, copied: Mapping[str, Any], count: int):
        self._span, self._header, self._copied, self._count = span, header, copied, count
        self._index, self._begins, self._ends = header.index, header.begins, header.ends
        self._extra: dict[str, Any] = {}

    def _stored(self, name: object) -> bool:
        i = self._index.get(name)  # type: ignore[call-overload]
        return i is not None and self._ends[i] > self._begins[i] and name not in self._copied

    def get(self, name: str, default: Any = None) -> Any:
        if self._extra and name in self._extra:
            return self._extra[name]
        i = self._index.get(name)  # _stored, inlined: the content pass asks once a tensor
        return self._span if i is not None and self._ends[i] > self._begins[i] and name not in self._copied \
            else default

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

    def file_ranges(self, names: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray] | None:
        """Where many names' bytes lie, at once: (the file's path, each name's first byte in it, its
        nbytes, its element size), as int64 arrays; None unless every name is a tensor of this header
        stored in place (not empty, not copied, not a name set later), so the caller asks name by name.
        The content pass samples a million small tensors: a lookup each in Python cost a second."""
        if not names or (self._extra and not self._extra.keys().isdisjoint(names)) or \
                (self._copied and not self._copied.keys().isdisjoint(names)):
            return None
        h = self._header
        try:
            at = list(map(self._index.__getitem__, names))
        except (KeyError, TypeError):
            return None
        idx = np.array(at, dtype=np.int64)
        begins = np.frombuffer(self._begins, dtype=np.int64)[idx]
        nbytes = np.frombuffer(self._ends, dtype=np.int64)[idx] - begins
        if not (nbytes > 0).all():
            return None
        itemsizes = np.fromiter(map(_ITEMSIZE, map(h.kinds.__getitem__, at)), dtype=np.int64, count=len(at))
        return self._span.path, begins + (self._span.offset + h.data_start), nbytes, itemsizes

    def __iter__(self):
        for name, begin, end in zip(self._header.names, self._begins, self._ends, strict=True):
            if end > begin and name not in self._copied and name not in self._extra:
                yield name
        yield from self._extra

    def __len__(self) -> int:
        return self._count + sum(1 for n in self._extra if not self._stored(n))


_ITEMSIZE = operator.attrgetter("itemsize")


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
    # Each dtype the file uses, checked once; the first record of one this torch lacks is named.
    codes = [code for code in set(map(operator.attrgetter("dtype"), header.kinds))
             if getattr(torch, DTYPES[code][0], None) is None]
    if codes:
        i = next(i for i, kind in enumerate(header.kinds) if kind.dtype in codes)
        raise TargetError(f"{header.path}: tensor {header.names[i]!r} has dtype {header.kinds[i].dtype}, which this "
                          f"torch {torch.__version__} does not support; upgrade torch")
    mapped = 0
    if storage is not None and header.names:
        # Whole columns at once: a record is mapped unless it is empty or starts off its element size.
        begins = np.frombuffer(header.begins, dtype=np.int64)
        stored = np.frombuffer(header.ends, dtype=np.int64) > begins
        itemsizes = np.fromiter(map(operator.attrgetter("itemsize"), header.kinds), dtype=np.int64,
                                count=len(header.kinds))
        unaligned = stored & ((header.data_start + begins) % itemsizes != 0)
        mapped = int(np.count_nonzero(stored & ~unaligned))
        for i in np.flatnonzero(unaligned).tolist():
            # A hand-made header whose length is not a multiple of the element size: a typed view
            # cannot start there, so this tensor (only) is copied into memory.
            e = header.entry(i)
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, header.data_start + e.begin, (e.end - e.begin,))
            copied[e.name] = raw.clone().view(getattr(torch, DTYPES[e.dtype][0])).reshape(e.shape)
    if copied:
        notes.append(f"{len(copied)} tensor(s) start at unaligned offsets and were copied into memory "
                     f"(e.g. {next(iter(copied))})")
    spans: Mapping[str, Any] = FileSpans(span, header, copied, mapped) if storage is not None else {}
    return MappedTensors(header, storage, copied), notes, spans


def file_summary(header: Header) -> dict[str, Any]:
    return {"file": header.path.name, "tensors": len(header.names), "bytes": header.file_size,
            "header_bytes": header.data_start}


def load_safetensors_file(path: Path, *, restore_aliases: bool = True) -> Subject:
    """One safetensors file; names its ``__metadata__`` records as aliases of a stored tensor
    (``safetensors.torch.save_model``) are restored as ties unless ``restore_aliases`` is False
    (a Hugging Face folder, whose architecture re-ties instead)."""
    header = read_header(path)
    tensors, notes, spans = map_tensors(header)
    aliases, broken = alias_map(header.metadata, header.index.keys())
    decls, pairs = alias_declarations(aliases, broken, path.name)
    if aliases or broken:
        how = (f"__metadata__ records {len(aliases)} dropped name{'s' if len(aliases) != 1 else ''} as "
               f"alias{'es' if len(aliases) != 1 else ''} of stored tensors (safetensors.torch.save_model)")
        notes.insert(0, f"{len(header.names)} tensors, {header.data_bytes:,} bytes of data; header read, data "
                        f"memory-mapped; {how}" + ("; restored as ties" if restore_aliases and aliases else ""))
    else:
        notes.insert(0, f"{len(header.names)} tensors, {header.data_bytes:,} bytes of data; header read, data "
                        f"memory-mapped (no alias map in __metadata__: ties come from the architecture)")
    findings = [finding("TC020", f"{path.name} __metadata__ says {k} is an alias of {v}, but the file holds no {v}: "
                                 f"a loader that restores aliases cannot restore {k}", [k, v])
                for k, v in sorted(broken.items())]
    stored_copies = None
    if restore_aliases and aliases:
        stored_copies = {n: ("file", path.name, n) for n in header.names}
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


