"""``torch.save`` zip archives read as records, without making a tensor per entry.

``torch.load(mmap=True, weights_only=True)`` makes every storage and tensor object while it
unpickles, in a pure-Python unpickler: at 100,000 tensors that alone takes about 20 s and
225 MiB over the torch import, before anything is analysed. The analyses need each tensor's
dtype, shape, strides, storage and offset, which the archive's ``data.pkl`` states outright.
So a zip written by ``torch.save`` is read here first, by ``pickleloop`` (a bounded loop over the
opcodes torch's weights-only unpickler implements, and no others) with every global answered by
a record builder of this module (only the handful of names ``torch.save`` writes for tensors and
containers), and each persistent storage id becomes a reference to its ``data/<key>`` record,
checked against the archive. Tensors are made on access, each a view into one read-only mapping
of the file, the storage sliced as ``torch.load(mmap=True)`` slices it, so a tensor made here is
what ``torch.load`` would have returned.

The loop reads the whole pickle whatever it holds, so its bounds hold for every file. A file that
breaks one (an opcode torch refuses, a memo index out of sequence, more objects than its size
allows, a tensor past its storage) is refused here, in one line: never handed to another parser.
A pickle that is sound but names something this reader does not build (a global the weights-only
unpickler allows, such as a quantized tensor; backward hooks), or an archive with compressed or
big-endian records, makes ``read_archive`` return None, and ``torch.load`` reads the vetted file.
"""

from __future__ import annotations

import io
import math
import operator
import pickle
from typing import Any, NamedTuple

import torch

from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.facts import span_elements
from tiecheck.loaders.formats.archive_tensors import ArchiveFile, TensorRecord, dtype_facts
from tiecheck.loaders.pickleloop import TORCH_OPCODES, Budget, Refused, Rules, check_containers, load
from tiecheck.loaders.pickles import Global, describe, first_refused, resolve, weights_only_allows
from tiecheck.loaders.zipcheck import ZipArchive

# The legacy storage classes torch.save names for each dtype (torch.storage's own table, which
# torch says will not grow: newer dtypes are written as an UntypedStorage plus a dtype global).
LEGACY_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}
_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}  # rebuilt by _rebuild_qtensor: torch.load's


def _dtype_table() -> dict[str, tuple[str, int]]:
    """name -> (canonical name, itemsize) of every dtype torch's namespace holds (read from its
    __dict__: a getattr could import one of torch's lazily loaded submodules for a name the file
    chose). Aliases (``float``, ``half``) map to their canonical names."""
    out = {}
    for name, dt in vars(torch).items():
        if isinstance(dt, torch.dtype) and name not in _QUANTIZED:
            out[name] = (str(dt).removeprefix("torch."), dt.itemsize)
    return out


DTYPES = _dtype_table()
MAX_PICKLE_BYTES = 1 << 30  # a data.pkl of 100,000 tensors is about 12 MB
# A deflated data.pkl may inflate to this many times its compressed size, plus the base: torch's
# pickles deflate about 5:1, and what is inflated is held in memory while it is read.
PICKLE_INFLATE_RATIO, PICKLE_INFLATE_BASE = 64, 16 << 20
INT64_LIMIT = 1 << 63  # sizes, strides, offsets and element counts torch can hold (int64)


class _NotTaken(Exception):
    """The archive holds something this reader leaves to torch.load."""


class _Opaque:
    """What a global this reader does not build stands for while the rest of the pickle is vetted."""

    def __repr__(self) -> str:
        return "<not built here>"


OPAQUE = _Opaque()


class _OpaqueStorage(_Opaque):
    """A storage type while the pickle is only vetted: not built, but the persistent ids naming it
    still say how many bytes each storage claims, for the check against its record."""

    def __init__(self, dtype: str | None):
        self.dtype = dtype


class _StorageType(NamedTuple):
    dtype: str | None  # None: an UntypedStorage, counted in bytes


class _DType(NamedTuple):
    name: str  # a torch dtype named by a _rebuild_tensor_v3 record


class _StorageRef(NamedTuple):
    key: str
    dtype: str | None
    numel: int  # elements of dtype (bytes for an UntypedStorage)


def _ints(v: Any) -> bool:
    """A tuple of ints torch can hold as sizes or strides (int64, non-negative: torch.save writes no
    negative stride). Built-ins only: it runs for every tensor of a file."""
    return type(v) is tuple and (not v or (set(map(type, v)) == _INT and min(v) >= 0 and max(v) < INT64_LIMIT))


_INT = {int}


class _StateDict(dict):
    """``collections.OrderedDict`` as unpickled here: a dict whose pickled attributes (a state
    dict's ``_metadata``, module versions) are dropped; only its items matter to the analysis."""


# What a global names here: a container type, or the name of a TorchRules method that builds a record.
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "rebuild_tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    **{("torch", name): _StorageType(dtype) for name, dtype in LEGACY_STORAGES.items()},
}


def _claim_of(pid: Any) -> _StorageRef | None:
    """The storage a persistent id of a pickle that is only vetted names, or None for an id torch.load
    cannot read (it says so itself). torch.load reads the record ``data/{key}`` whatever the key's type,
    so a key that is not a str (which torch.save never writes, but a hand-edited file may) names a record
    too: an int 0 names data/0."""
    if type(pid) is tuple and len(pid) == 5 and type(pid[1]) is _OpaqueStorage \
            and type(pid[4]) is int and 0 <= pid[4] < INT64_LIMIT:
        return _StorageRef(f"{pid[2]}", pid[1].dtype, pid[4])
    return None


class TorchRules(Rules):
    """``data.pkl`` as ``torch.save`` writes it: every global answered by this class, nothing from
    the file imported or called except the record builders below.

    With ``build=False`` nothing is built (every global is opaque): the pickle is only vetted, for a
    file that ``torch.load`` then reads (legacy files, archives with compressed records).
    """

    opcodes = TORCH_OPCODES
    dict_types = (dict, _StateDict)

    def __init__(self, build: bool = True):
        self.building = build
        self.storages: dict[str, _StorageRef] = {}
        self.records: list[TensorRecord] = []  # every tensor record built, for the bounds check
        self.not_taken: str | None = None  # why torch.load must read the file, once something is not built

    def _opaque(self, why: str) -> _Opaque:
        if self.not_taken is None:
            self.not_taken = why
        return OPAQUE

    def global_(self, module: str, name: str, offset: int) -> Any:
        found = _GLOBALS.get((module, name))
        if found is _StateDict:
            return found
        if found is not None and self.building:
            return getattr(self, found) if isinstance(found, str) else found
        if type(found) is _StorageType:
            return _OpaqueStorage(found.dtype)
        if module == "torch" and name in DTYPES and self.building:
            return _DType(DTYPES[name][0])
        g = resolve(module, name)
        if found is not None or weights_only_allows(g):
            return self._opaque(f"global {g}")
        written = f"{module}.{name}"
        raise Refused(f"the global {describe(Global(g, offset, written if written != g else ''))}", offset,
                      untrusted=True)

    def call(self, func: Any, args: tuple, offset: int) -> Any:
        if isinstance(func, _Opaque):
            return OPAQUE
        if func is _StateDict:
            if args:
                raise Refused("calls OrderedDict with arguments; torch.save writes it empty, then its items", offset)
            return _StateDict()
        if callable(func) and getattr(func, "__self__", None) is self:
            try:
                return func(*args)
            except _NotTaken as e:
                return self._opaque(str(e))
            except Refused as e:
                e.offset = e.offset or offset  # the builders do not know where their REDUCE is
                raise
        raise Refused(f"calls {func!r}, which torch.save never calls", offset)

    def new(self, cls: Any, args: tuple, offset: int) -> Any:
        if isinstance(cls, _Opaque):
            return OPAQUE
        if cls is _StateDict and not args:
            return _StateDict()
        raise Refused(f"makes an object of {cls!r}, which torch.save never does", offset)

    def build(self, inst: Any, state: Any, offset: int) -> None:
        if isinstance(inst, _Opaque):
            return
        if type(inst) is _StateDict and type(state) is dict:
            return  # a state dict's _metadata: not needed by the analysis
        raise Refused(f"sets the state of a {type(inst).__name__}, which torch.save never does", offset)

    def persistent(self, pid: Any, offset: int) -> Any:
        if not self.building:
            self._claim(pid, offset)
            return OPAQUE
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage" or type(pid[2]) is not str:
            raise Refused("names a storage by an id that is not ('storage', type, key, location, size)", offset)
        if pid[1] is OPAQUE:
            return OPAQUE
        if type(pid[1]) is not _StorageType or type(pid[4]) is not int or not 0 <= pid[4] < INT64_LIMIT:
            raise Refused(f"names storage {pid[2]!r} with a type or size torch cannot hold", offset)
        ref = _StorageRef(pid[2], pid[1].dtype, pid[4])
        known = self.storages.setdefault(ref.key, ref)
        if known != ref:
            raise Refused(f"names storage {ref.key!r} twice, with different types or sizes", offset)
        return known

    # -- the record builders, in place of torch._utils' rebuild functions --------------------
    def _claim(self, pid: Any, offset: int) -> None:
        """Note the size a vetted pickle's storage id claims; an id torch.load cannot read is left to it."""
        ref = _claim_of(pid)
        if ref is not None and self.storages.setdefault(ref.key, ref) != ref:
            raise Refused(f"names storage {ref.key!r} twice, with different types or sizes", offset)

    def _record(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                dtype: str | None) -> TensorRecord:
        if storage is OPAQUE or dtype is None:
            raise _NotTaken("a tensor over a storage this reader does not take")
        if type(storage) is not _StorageRef or type(offset) is not int or not 0 <= offset < INT64_LIMIT or \
                not _ints(size) or not _ints(stride) or len(size) != len(stride) or type(requires_grad) is not bool:
            raise Refused("describes a tensor with a storage, offset, size, stride or requires_grad of the wrong "
                          "type or out of range", 0)
        numel = math.prod(size)
        if numel >= INT64_LIMIT:
            raise Refused(f"describes a tensor of size {list(size)}: {numel:,} elements, more than torch can count "
                          f"(torch.load refuses it: numel overflow)", 0)
        reach = offset + 1 + sum(map(operator.mul, size, stride)) - sum(stride) if numel else offset
        if reach * DTYPES[dtype][1] >= INT64_LIMIT:
            raise Refused(f"describes a tensor of size {list(size)} and stride {list(stride)} reaching past any "
                          f"storage torch can address", 0)
        record = TensorRecord(storage.key, dtype, offset, size, stride, requires_grad)
        self.records.append(record)
        return record

    def rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad, hooks, metadata=None) -> TensorRecord:
        if hooks or metadata:
            raise _NotTaken("backward hooks or tensor metadata")
        return self._record(storage, offset, size, stride, requires_grad,
                            storage.dtype if type(storage) is _StorageRef else None)

    def rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype,
                          metadata=None) -> TensorRecord:
        if hooks or metadata or dtype is OPAQUE:
            raise _NotTaken("backward hooks, tensor metadata or a dtype this reader does not take")
        if type(dtype) is not _DType or (type(storage) is _StorageRef and storage.dtype is not None):
            raise Refused("describes a typed tensor record without a dtype, or over a typed storage", 0)
        return self._record(storage, offset, size, stride, requires_grad, dtype.name)

    def rebuild_parameter(self, data, requires_grad, hooks) -> TensorRecord:
        if data is OPAQUE or hooks:
            raise _NotTaken("a parameter this reader does not take")
        if type(data) is not TensorRecord or type(requires_grad) is not bool:
            raise Refused("describes a parameter that is not a tensor record", 0)
        return data._replace(requires_grad=requires_grad)


class _StandIn:
    """What every global of a trusted pickle stands for while its storage ids are read: it takes
    any call, state or item, so nothing the file names is imported or run here."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _StandIn:
        return _StandIn()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _ClaimUnpickler(pickle.Unpickler):
    """A trusted data.pkl read for its storage ids only. The loop cannot walk every pickle a user
    may trust (protocol 1's INT, protocol 4's FRAME), so Python's own unpickler reads it here, with
    every global a stand-in: torch.load then runs the file, on the user's word."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        return _OpaqueStorage(found.dtype) if type(found) is _StorageType else _StandIn

    def persistent_load(self, pid: Any) -> Any:
        ref = _claim_of(pid)
        if ref is not None:
            self.storages.setdefault(ref.key, ref)
        return _StandIn()


def _trusted_claims(data: bytes) -> dict[str, _StorageRef] | None:
    """The storages a trusted data.pkl names, or None where even the stand-ins cannot read it."""
    reader = _ClaimUnpickler(data)
    try:
        reader.load()
    except Exception:  # noqa: BLE001 - what cannot be read here, torch.load reads (or refuses) itself
        return None
    return reader.storages


def check_storage_fits(label: str, key: str, nbytes: int, held: int) -> None:
    """A storage must fit its record: ``torch.load(mmap=True)`` slices ``nbytes`` from the mapping
    without looking at the record's size, so a short record would lend the storage the bytes of
    whatever follows it in the file.

    Raises:
        TargetError: the storage claims more bytes than its record ``data/<key>`` holds.
    """
    if nbytes > held:
        raise TargetError(f"{label}: storage {key!r} claims {nbytes:,} bytes, but its record data/{key} holds "
                          f"{held:,}; the file is truncated or corrupt")


def _storage_bytes(ref: _StorageRef) -> int:
    return ref.numel * (1 if ref.dtype is None else dtype_facts(ref.dtype)[0])


def pickle_budget(stored: int) -> Budget:
    """The budget of a data.pkl whose record stores ``stored`` bytes (compressed or not)."""
    return Budget(stored)


def _archive_records(za: ZipArchive) -> tuple[str, bytes, int, int, dict[str, tuple[int, int]] | None]:
    """(data.pkl's name, its bytes, its offset in the file, its stored size, the stored ``data/<key>``
    records as (file offset, size)); the records are None when the archive needs torch.load
    (compressed records, big-endian data).

    Raises:
        TargetError: not one data.pkl, or a damaged archive.
    """
    pickles = [n for n in za.infos if n.endswith("/data.pkl") and n.count("/") == 1]
    # torch.load refuses a record outside the archive's one root folder ("file in archive is not in a
    # subdirectory"): such an archive is left to the caller's layout check, as one without data.pkl is.
    if len(pickles) != 1 or any(not n.startswith(pickles[0][:-len("data.pkl")]) for n in za.infos):
        raise _NotTaken("not one root folder holding data.pkl")
    info = za.check(pickles[0])
    limit = MAX_PICKLE_BYTES
    if info.compress_type != 0:  # deflated: inflated into memory, so only as far as its size makes plausible
        limit = min(limit, PICKLE_INFLATE_RATIO * info.compress_size + PICKLE_INFLATE_BASE)
    data = za.read(pickles[0], limit=limit)
    span = za.span(pickles[0])
    offset = span[0] if span else info.header_offset
    prefix = pickles[0][:-len("data.pkl")]
    records: dict[str, tuple[int, int]] | None = {}
    if prefix + "byteorder" in za.infos and za.read(prefix + "byteorder", limit=16) != b"little":
        records = None
    where = prefix + "data/"
    for name in za.infos:
        if records is not None and name.startswith(where):
            span = za.span(name)
            if span is None:
                records = None  # compressed: torch.load copies it out
            else:
                records[name[len(where):]] = span
    return pickles[0], data, offset, info.compress_size, records


def vet_archive(za: ZipArchive, *, trusted: bool) -> None:
    """Run the archive's data.pkl through the loop without building anything (for torch.load), and
    check that every storage it names fits its record.

    Args:
        za: the archive.
        trusted: the user vouched for the pickle (``--trust-pickle``): no global is refused, its
            storage ids are read with stand-ins for its globals, and a pickle even they cannot read
            is left to torch.load whole.

    Raises:
        PickleRefusal: the pickle breaks a bound or names a global the weights-only unpickler refuses.
        TargetError: a storage claims more bytes than its record holds.
    """
    try:
        name, data, offset, stored, _ = _archive_records(za)
    except _NotTaken:
        return  # torch.load says what is wrong with the archive's layout
    if trusted:
        storages = _trusted_claims(data)
        if storages is None:
            return
    else:
        rules = TorchRules(build=False)
        try:
            load(data, rules, pickle_budget(stored))
        except Refused as e:
            raise PickleRefusal.of(e, za.label, "data.pkl", offset, data) from e
        storages = rules.storages
    where = name[:-len("data.pkl")] + "data/"
    for key, ref in storages.items():
        info = za.infos.get(where + key)
        if info is not None:  # a missing record: torch.load names it
            check_storage_fits(za.label, key, _storage_bytes(ref), info.file_size)


def _checked_archive(path: str) -> tuple[bytes, int, int, dict[str, tuple[int, int]] | None] | None:
    """data.pkl, its offset and stored size, and the storage records of an archive whose every
    record was checked (none sharing bytes: that would alias storages torch keeps apart); None
    when the archive has not one data.pkl."""
    with ZipArchive(path, path) as za:
        try:
            _, data, offset, stored, records = _archive_records(za)
        except _NotTaken:
            return None
        if records is not None:
            za.check_all()
    return data, offset, stored, records


def read_archive(path: str) -> tuple[Any, ArchiveFile] | None:
    """The object a ``torch.save`` zip holds, with ``TensorRecord`` in place of each tensor, and the
    file that makes them tensors; None when the (vetted) archive needs ``torch.load``.

    Raises:
        TargetError: the archive is damaged (from ``ZipArchive``), or its pickle breaks a bound of
            the loop or describes tensors no storage holds (``PickleRefusal`` for the pickle).
    """
    got = _checked_archive(path)  # the archive's directory is let go first: 40 MB at 100,000 records
    if got is None:
        return None
    data, offset, stored, records = got
    rules = TorchRules(build=records is not None)
    try:
        obj, _ = load(data, rules, pickle_budget(stored))
    except Refused as e:
        raise PickleRefusal.of(e, path, "data.pkl", offset, data) from e
    if rules.not_taken is not None or records is None:
        return None
    del data
    try:
        check_containers(obj)
    except Refused as e:
        raise TargetError(f"{path}: data.pkl {e.why}") from e
    storages = {}  # key -> (file offset, bytes the storage holds)
    for key, ref in rules.storages.items():
        span = records.get(key)
        if span is None:
            raise TargetError(f"{path}: data.pkl names storage {key!r}, but the archive has no record data/{key}; "
                              f"it is partial or corrupt")
        nbytes = _storage_bytes(ref)
        check_storage_fits(path, key, nbytes, span[1])
        storages[key] = (span[0], nbytes)
    del records
    for r in rules.records:
        # Element offsets count in the tensor's dtype, whatever the storage's (v3 records).
        itemsize = dtype_facts(r.dtype)[0]
        if r.offset + span_elements(r.shape, r.stride) > storages[r.key][1] // itemsize:
            raise TargetError(f"{path}: a tensor of size {list(r.shape)} at offset {r.offset:,} reaches past the "
                              f"end of storage {r.key!r} ({storages[r.key][1]:,} bytes); torch.load refuses it too")
    for dtype in {r.dtype for r in rules.records}:
        torch.empty(0, dtype=getattr(torch, dtype))  # torch's warning about an experimental dtype, while loading
    return obj, ArchiveFile(path, storages)


class PickleRefusal(TargetError):
    """A pickle the loop refused: one line naming the file, the record and the byte."""

    @classmethod
    def of(cls, e: Refused, label: str, record: str, base: int, data: bytes, of: str = "the file") -> TargetError:
        """The error for ``e``; a refused global is named even when an opcode before it was refused
        first (a protocol-4 payload frames its STACK_GLOBAL)."""
        where = f"{record}, byte {base + e.offset:,} of {of}"
        if e.untrusted and not e.why.startswith("the global"):
            g = first_refused(data)
            if g is not None:
                e = Refused(f"the global {describe(g)}", g.offset, untrusted=True)
                where = f"{record}, byte {base + g.offset:,} of {of}"
        if e.untrusted and e.why.startswith("the global"):
            return UntrustedPickleError(
                f"{label}: refused to unpickle {e.why} ({where}): a weights-only load accepts tensors and plain "
                f"containers only, and unpickling anything else can run arbitrary code. If you trust this file, "
                f"rerun with --trust-pickle")
        if e.untrusted:
            return UntrustedPickleError(
                f"{label}: refused to unpickle {record}: it {e.why} ({where}); torch.load refuses it too, and "
                f"torch.save never writes it. If you trust this file, rerun with --trust-pickle")
        if e.bound:  # torch.save writes such a pickle and torch.load reads it: the bound is tiecheck's own
            return cls(f"{label}: {record} {e.why} ({where}), a bound kept on files that are not trusted. If you "
                       f"trust this file, rerun with --trust-pickle")
        return cls(f"{label}: {record} {e.why} ({where}); not a pickle torch.save writes")
