"""The rules of the torch.save record reader (``TorchRules``), each handed a data.pkl that breaks it.

torch.save never writes these pickles; each is made with a ``pickle.Pickler`` that writes the
opcodes a hand-edited or hostile file would hold, put in place of a real archive's data.pkl, and
must be refused in the reader's words, or (where torch.load reads it and the reader does not
build it) left to torch.load after the bounds.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict

import pytest
import torch

from tiecheck.errors import TargetError
from tiecheck.loaders import load_target
from tiecheck.loaders.formats.torchzip import read_archive

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
