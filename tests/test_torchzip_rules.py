"""The rules of the torch.save record reader (``TorchRules``), each handed a data.pkl that breaks it.

torch.save never writes these pickles; each is made with a ``pickle.Pickler`` that writes the
opcodes a hand-edited or hostile file would hold, put in place of a real archive's data.pkl, and
must be refused in the reader's words, or (where torch.load reads it and the reader does not
build it) left to torch.load after the bounds.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict

import pytest
import torch

from tiecheck import analyze
from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.loaders import load_path, load_target
from tiecheck.loaders.formats.torchzip import TorchRules, _StorageRef, read_archive

from support.checkpoints import rewrite_zip_entry


class Reduce:
    """Pickled as the given ``__reduce__`` tuple."""

    def __init__(self, *reduction):
        self.reduction = reduction


def _storage_id(numel: int, cls=torch.FloatStorage, key: str = "0"):
    return ("storage", cls, key, "cpu", numel)


class _Writer(pickle.Pickler):
    def __init__(self, buf, pid):
        super().__init__(buf, protocol=2)
        self.pid = pid

    def persistent_id(self, obj):
        if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
            return self.pid(obj)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Reduce):
            return obj.reduction
        if isinstance(obj, torch.Tensor):
            return torch._utils._rebuild_tensor_v2, (obj.untyped_storage(), 0, tuple(obj.shape), tuple(obj.stride()),
                                                     False, OrderedDict())
        return NotImplemented


def _pickled(obj, pid=lambda s: _storage_id(4)) -> bytes:
    buf = io.BytesIO()
    _Writer(buf, pid).dump(obj)
    return buf.getvalue()


def _archive(tmp_path, obj, pid=lambda s: _storage_id(4)):
    """A torch.save archive of four floats whose data.pkl is ``obj`` as ``_Writer`` pickles it (or those bytes)."""
    src, out = tmp_path / "ok.pt", tmp_path / "edited.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    rewrite_zip_entry(src, out, "/data.pkl", obj if isinstance(obj, bytes) else _pickled(obj, pid))
    return out


def _made_by_newobj(args: bytes) -> bytes:
    """{"w": W} as an OrderedDict made by NEWOBJ with the pickled argument tuple ``args`` (pickle
    itself writes NEWOBJ only for a class's own objects), then filled by SETITEMS."""
    data = _pickled(OrderedDict([("w", W)]))
    at = data.index(b"OrderedDict\n")
    head, tail = data[:at], data[at:]
    assert b")R" in tail  # EMPTY_TUPLE REDUCE: OrderedDict()
    return head + tail.replace(b")R", args + b"\x81", 1)  # ... NEWOBJ


W = torch.zeros(4)  # pickled as a tensor record over the archive's storage "0"


@pytest.mark.parametrize(("obj", "pid", "says"), [
    (Reduce(OrderedDict, ([("w", W)],)), None, "calls OrderedDict with arguments; torch.save writes it empty"),
    (lambda: _made_by_newobj(b"K\x01\x85"), None, "makes an object of"),  # OrderedDict.__new__(OrderedDict, 1)
    (Reduce(OrderedDict, (), [1, 2]), None, "sets the state of a _StateDict, which torch.save never does"),
    ({"w": W}, lambda s: ("storage", torch.FloatStorage, "0", "cpu"), r"names a storage by an id that is not"),
    ({"w": W}, lambda s: ("tensor", torch.FloatStorage, "0", "cpu", 4), r"names a storage by an id that is not"),
    ({"w": W}, lambda s: ("storage", torch.FloatStorage, 0, "cpu", 4), r"names a storage by an id that is not"),
    ({"w": W}, lambda s: ("storage", "FloatStorage", "0", "cpu", 4), "names storage '0' with a type or size torch "
                                                                       "cannot hold"),
    ({"w": W}, lambda s: ("storage", torch.FloatStorage, "0", "cpu", -1), "with a type or size torch cannot hold"),
    ({"w": W}, lambda s: ("storage", torch.FloatStorage, "0", "cpu", 4.0), "with a type or size torch cannot hold"),
    ({"w": W, "v": Reduce(torch._utils._rebuild_tensor_v2, (torch.zeros(2).untyped_storage(), 0, (2,), (1,), False,
                                                                 OrderedDict()))},
     lambda s: _storage_id(4 if s.nbytes() == 16 else 2), "names storage '0' twice, with different types or sizes"),
    (Reduce(torch._utils._rebuild_tensor_v2, (W.untyped_storage(), 0, (-1,), (1,), False, OrderedDict())), None,
     "of the wrong type or out of range"),
    (Reduce(torch._utils._rebuild_tensor_v2, (W.untyped_storage(), 0, (2.0,), (1,), False, OrderedDict())), None,
     "of the wrong type or out of range"),
    (Reduce(torch._utils._rebuild_tensor_v2, (W.untyped_storage(), 0, (2,), (1, 1), False, OrderedDict())), None,
     "of the wrong type or out of range"),
    (Reduce(torch._utils._rebuild_tensor_v2, (W.untyped_storage(), 0, (2,), (1,), 1, OrderedDict())), None,
     "of the wrong type or out of range"),
])
def test_a_pickle_torch_save_never_writes_is_refused_in_the_readers_words(tmp_path, obj, pid, says):
    path = _archive(tmp_path, obj() if callable(obj) else obj, pid or (lambda s: _storage_id(4)))
    with pytest.raises(TargetError, match=says):
        read_archive(str(path))
    with pytest.raises(TargetError, match=says):
        load_target(str(path))


def test_an_ordered_dict_made_by_newobj_and_filled_by_setitems_is_read(tmp_path):
    """NEWOBJ of an OrderedDict with no arguments, then its items: torch's unpickler makes the same dict."""
    path = _archive(tmp_path, _made_by_newobj(b")"))
    assert list(torch.load(path, weights_only=True)) == ["w"]
    obj, archive = read_archive(str(path))
    assert list(obj) == ["w"]
    assert torch.equal(archive.tensors(obj)["w"], torch.arange(4.0))


def test_a_tensor_over_an_untyped_storage_is_left_to_torch_load(tmp_path):
    """_rebuild_tensor_v2 over an UntypedStorage: a record without a dtype, which the reader does
    not build; torch.load reads the file after the bounds."""
    path = _archive(tmp_path, {"w": W}, lambda s: _storage_id(16, torch.UntypedStorage))
    assert read_archive(str(path)) is None
    want = torch.load(path, weights_only=True)["w"]
    got = load_target(str(path)).tensors["w"]
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def _v3(storage_cls=torch.UntypedStorage, dtype=torch.float32, hooks=None, metadata=None):
    """A _rebuild_tensor_v3 record of four elements (torch.save writes one for the newer dtypes)."""
    args = (W.untyped_storage(), 0, (4,), (1,), False, hooks or OrderedDict(), dtype)
    return Reduce(torch._utils._rebuild_tensor_v3, args + ((metadata,) if metadata else ())), \
        (lambda s: _storage_id(16 if storage_cls is torch.UntypedStorage else 4, storage_cls))


def _parameter(data, requires_grad=True, hooks=None):
    return Reduce(torch._utils._rebuild_parameter, (data, requires_grad, hooks or OrderedDict()))


def _v2(size, stride, hooks=None, metadata=None):
    args = (W.untyped_storage(), 0, size, stride, False, hooks or OrderedDict())
    return Reduce(torch._utils._rebuild_tensor_v2, args + ((metadata,) if metadata else ()))


@pytest.mark.parametrize(("obj", "pid", "says"), [
    ({"w": _v3(torch.FloatStorage)[0]}, _v3(torch.FloatStorage)[1], "describes a typed tensor record without a dtype, "
                                                                     "or over a typed storage"),
    ({"w": _v3(dtype="float32")[0]}, _v3()[1], "describes a typed tensor record without a dtype"),
    ({"w": _parameter(1)}, None, "describes a parameter that is not a tensor record"),
    ({"w": _parameter(W, requires_grad="yes")}, None, "describes a parameter that is not a tensor record"),
    # 2**61 floats: countable, but reaching 2**63 bytes, past anything torch can address
    ({"w": _v2((2 ** 61,), (1,))}, None, r"describes a tensor of size \[2305843009213693952\] and stride \[1\] "
                                         r"reaching past any storage torch can address"),
])
def test_a_record_torch_save_never_writes_is_refused(tmp_path, obj, pid, says):
    path = _archive(tmp_path, obj, pid or (lambda s: _storage_id(4)))
    with pytest.raises(TargetError, match=says):
        read_archive(str(path))


def test_the_largest_addressable_record_is_taken():
    """One element fewer than the refused case above: 2**61 - 1 floats end below 2**63 bytes."""
    rules = TorchRules()
    ref = _StorageRef("0", "float32", 4)
    assert rules.rebuild_tensor_v2(ref, 0, (2 ** 61 - 1,), (1,), False, OrderedDict()).shape == (2 ** 61 - 1,)


@pytest.mark.parametrize("obj", [
    {"w": _v2((4,), (1,), hooks=OrderedDict([(0, 1)]))},
    {"w": _v2((4,), (1,), metadata={"x": 1})},
    {"w": _v3(hooks=OrderedDict([(0, 1)]))[0]},
    {"w": _parameter(W, hooks=OrderedDict([(0, 1)]))},
])
def test_records_with_hooks_or_metadata_are_not_built_here(tmp_path, obj):
    """Backward hooks or tensor metadata: torch's rebuild functions act on them, this reader does not,
    so it leaves the file to torch.load (after the bounds), whatever that then says."""
    pid = _v3()[1] if "_rebuild_tensor_v3" in repr(getattr(obj["w"], "reduction", ())) else (lambda s: _storage_id(4))
    assert read_archive(str(_archive(tmp_path, obj, pid))) is None


def test_a_storage_without_its_record_is_refused(tmp_path):
    src, bad = tmp_path / "ok.pt", tmp_path / "partial.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/0"):
                zout.writestr(info, zin.read(info))
    with pytest.raises(TargetError, match=r"data.pkl names storage '0', but the archive has no record data/0; it is "
                                          r"partial or corrupt"):
        read_archive(str(bad))


def test_a_container_that_holds_itself_is_refused(tmp_path):
    """torch.load(weights_only=True) builds the cycle (its memo allows it); the analysis would walk it forever."""
    loop: list = []
    loop.append(loop)
    path = _archive(tmp_path, {"w": W, "loop": loop})
    got = torch.load(path, weights_only=True)["loop"]
    assert got[0] is got
    with pytest.raises(TargetError, match="holds a container that contains itself"):
        read_archive(str(path))


def test_a_refused_global_says_how_to_go_on(tmp_path):
    path = _archive(tmp_path, {"w": W, "x": Reduce(print, ("hi",))})
    with pytest.raises(TargetError) as e:
        read_archive(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused to unpickle the global 'builtins.print'")
    assert re.search(r" \(data.pkl, byte \d+ of the file\): a weights-only load accepts tensors and plain containers "
                     r"only, and unpickling anything else can run arbitrary code. If you trust this file, rerun with "
                     r"--trust-pickle$", msg), msg


def test_overlapping_records_are_refused(tmp_path):
    """Two storage records over the same bytes would alias storages torch keeps apart."""
    src, bad = tmp_path / "ok.pt", tmp_path / "overlap.pt"
    torch.save({"a": torch.arange(4.0), "b": torch.ones(4)}, src)
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        infos = {i.filename.rsplit("/", 1)[-1]: i for i in z.infolist() if "/data/" in i.filename}
    # The central directory entry of record 1 pointed at record 0's local header: both read one range.
    for at in (i for i in range(len(raw) - 46) if raw[i:i + 4] == b"PK\x01\x02"):
        if int.from_bytes(raw[at + 42:at + 46], "little") == infos["1"].header_offset:
            raw[at + 42:at + 46] = infos["0"].header_offset.to_bytes(4, "little")
    bad.write_bytes(bytes(raw))
    with pytest.raises(TargetError, match="two records share bytes, so the archive is refused"):
        read_archive(str(bad))


def test_calling_a_storage_class_is_refused(tmp_path):
    """A storage class is only ever a part of a storage id; a pickle that calls one is not torch.save's."""
    path = _archive(tmp_path, {"w": W, "s": Reduce(torch.FloatStorage, (4,))})
    with pytest.raises(TargetError, match=r"calls .*which torch.save never calls"):
        read_archive(str(path))


def test_a_hostile_global_is_refused_before_torch_load_on_every_path(tmp_path):
    """fix reads a file whole with torch.load: the pickle's bounds and globals are checked first."""
    touched = tmp_path / "touched"
    path = _archive(tmp_path, {"w": W, "x": Reduce(open, (str(touched), "w"))})
    for whole in (False, True):
        with pytest.raises(UntrustedPickleError, match=r"the global 'io.open'"):
            load_path(path, whole=whole)
    assert not touched.exists()


def test_a_strided_view_is_compared_by_its_elements_not_its_storage_bytes(tmp_path):
    """x.t() is stored as x's storage with swapped strides: equal, element for element, to a
    contiguous copy of x.t(); the content pass must read it through its strides."""
    x = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "t.pt"
    torch.save({"a": x.t(), "b": x.t().contiguous()}, path)
    found = [(f.code, f.names) for f in analyze(str(path)).findings]
    assert ("TC005", ("a", "b")) in found


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_a_quantized_parameter_is_left_to_torch_load(tmp_path):
    """_rebuild_parameter over a quantized tensor: the reader builds neither, torch.load reads both."""
    path = tmp_path / "qp.pt"
    q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    torch.save({"q": torch.nn.Parameter(q, requires_grad=False), "w": torch.ones(2)}, path)
    assert read_archive(str(path)) is None
    assert sorted(load_target(str(path)).tensors) == ["q", "w"]
