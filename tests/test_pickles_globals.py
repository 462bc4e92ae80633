"""Naming what a refused pickle wanted to import (``loaders.pickles``): every global of real pickles of
each protocol, where ``pickletools`` finds it, under the name ``pickle`` resolves it to, and the
verdict torch's weights-only unpickler gives it."""

from __future__ import annotations

import builtins
import collections
import io
import mmap
import os.path
import pickle
import pickletools
import subprocess

import pytest
import torch
from torch import _weights_only_unpickler as wou

from tiecheck.loaders.pickles import (
    Global,
    describe,
    first_refused,
    globals_in,
    resolve,
    weights_only_allows,
)

PICKLES_BOUND = 8  # pickles walked in one source (a number: the module's constant would move with its mutant)
FUNCS = [collections.OrderedDict, collections.Counter, os.path.join, builtins.eval, torch._utils._rebuild_tensor_v2]


def _where(data: bytes) -> list[int]:
    return [pos for op, _, pos in pickletools.genops(data) if op.name in ("GLOBAL", "INST", "STACK_GLOBAL")]


def _written(data: bytes) -> list[str]:
    """How each GLOBAL writes its name (protocols 0-2 write Python 2's ``__builtin__``); "" for STACK_GLOBAL."""
    return [arg.replace(" ", ".") if op.name == "GLOBAL" else "" for op, arg, _ in pickletools.genops(data)
            if op.name in ("GLOBAL", "STACK_GLOBAL")]


def _names(objs) -> list[str]:
    return [f"{pickle.whichmodule(f, f.__qualname__)}.{f.__qualname__}" for f in objs]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_global_of_every_protocol_is_named_where_pickletools_finds_it(protocol):
    """Protocols 0 to 3 write GLOBAL; 4 and 5 STACK_GLOBAL, with a module name seen before fetched
    from the memo."""
    data = pickle.dumps([FUNCS, "pad", 1.5], protocol=protocol)
    assert [(g.name, g.offset, g.written) for g in globals_in(data, base=100)] == [
        (name, 100 + pos, "" if written == name else written)
        for name, pos, written in zip(_names(FUNCS), _where(data), _written(data), strict=True)]
    assert ("__builtin__.eval" in _written(data)) == (protocol < 3)


def test_a_module_name_from_the_memo_past_256_entries():
    """Protocol 4 fetches a name stored 256 or more entries back with LONG_BINGET."""
    data = pickle.dumps([*[str(i) for i in range(300)], collections.OrderedDict, collections.Counter], protocol=4)
    assert "LONG_BINGET" in {op.name for op, _, _ in pickletools.genops(data)}
    assert [g.name for g in globals_in(data)] == ["collections.OrderedDict", "collections.Counter"]


@pytest.mark.parametrize(("written", "python3"), [
    (("__builtin__", "eval"), "builtins.eval"),
    (("__builtin__", "xrange"), "builtins.range"),
    (("commands", "getoutput"), "subprocess.getoutput"),
    (("copy_reg", "_reconstructor"), "copyreg._reconstructor"),
    (("collections", "OrderedDict"), "collections.OrderedDict"),
])
def test_python_2_names_resolve_as_pickle_resolves_them(written, python3):
    data = b"\x80\x02c" + f"{written[0]}\n{written[1]}\n".encode() + b"."
    obj = pickle.loads(data)  # the object itself, not called
    assert f"{obj.__module__}.{obj.__qualname__}".replace("_collections", "collections") in (python3, "posix.getoutput")
    assert resolve(*written) == python3
    g = globals_in(data)[0]
    shown = ".".join(written)
    assert g == Global(python3, 2, "" if shown == python3 else shown)
    assert describe(g) == repr(python3) + ("" if shown == python3 else f" (written as {shown!r})")


def test_a_name_built_at_run_time_is_reported_as_such():
    """STACK_GLOBAL whose names are not strings the walk can see (an int here; a call's result in a
    real payload) is still a global, reported without a name."""
    data = b"\x80\x04K\x01\x8c\x01n\x93."
    assert globals_in(data) == [Global("<a name built at run time>", 7, "")]
    data = b"\x80\x04\x93."
    assert globals_in(data) == [Global("<a name built at run time>", 2, "")]


def test_pickles_back_to_back_are_walked_up_to_the_bound():
    """A legacy torch.save file is five pickles then raw bytes: each is walked, the raw bytes are not."""
    one = pickle.dumps(collections.OrderedDict, protocol=2)
    data = one * (PICKLES_BOUND + 1)
    assert [g.offset for g in globals_in(data)] == [i * len(one) + 2 for i in range(PICKLES_BOUND)]
    assert globals_in(one + b"c" + one) == globals_in(one)  # the next pickle must start with PROTO
    first = pickle.dumps(collections.OrderedDict, protocol=0)  # a first pickle without PROTO is walked
    assert [g.name for g in globals_in(first + one)] == ["collections.OrderedDict"] * 2


def test_a_real_legacy_file_names_its_globals_and_torch_allows_them(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    names = [g.name for g in globals_in(data)]
    assert "torch._utils._rebuild_tensor_v2" in names
    assert "torch.FloatStorage" in names
    assert first_refused(data) is None
    torch.load(path, weights_only=True)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert [g.name for g in globals_in(m)] == names  # a mapping is walked like bytes


def test_a_damaged_pickle_reports_the_globals_before_the_damage():
    data = pickle.dumps([collections.OrderedDict, os.path.join], protocol=2)
    cut = data[:_where(data)[1] + 3]
    assert [g.name for g in globals_in(cut)] == ["collections.OrderedDict"]
    assert globals_in(b"") == []
    assert globals_in(io.BytesIO(b"\x80\x02\xff")) == []


def _torch_allows(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    data = b"\x80\x02c" + f"{module}\n{attr}\n".encode() + b"."
    try:
        wou.Unpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        return False
    return True


@pytest.mark.parametrize("name", ["collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.float16",
                                  "builtins.eval", "os.system", "os.path.join", "sys.exit", "subprocess.Popen",
                                  "torch.nn.Module", "torch.serialization.load"])
def test_the_verdict_is_the_weights_only_unpicklers(name):
    assert weights_only_allows(name) == _torch_allows(name)


def test_a_user_allowed_global_is_allowed_unless_its_module_is_blocked():
    with torch.serialization.safe_globals([subprocess.Popen]):
        assert weights_only_allows("subprocess.Popen")
        assert _torch_allows("subprocess.Popen")
    assert not weights_only_allows("subprocess.Popen")


def test_storage_names_are_allowed_as_the_legacy_loader_maps_them():
    """Any torch.<X>Storage: the legacy loader makes a storage type of the name before the allowlist."""
    assert weights_only_allows("torch.FloatStorage")
    assert weights_only_allows("torch.cuda.HalfStorage")
    assert not weights_only_allows("torch.Storagex")
    assert not weights_only_allows("mod.FloatStorage")


def test_the_first_refused_global_is_named_with_its_offset():
    data = pickle.dumps([collections.OrderedDict, os.path.join, builtins.eval], protocol=4)
    g = first_refused(data, base=7)
    assert (g.name, g.offset) == ("posixpath.join", 7 + _where(data)[1])
    assert describe(Global("a\nb", 0, "")) == "'a\\nb'"


def test_a_module_name_hidden_in_the_memo_by_put_is_named():
    """pickle writes MEMOIZE in protocol 4, but BINPUT and LONG_BINPUT read there too: a payload can
    store the module name with them, pop it and fetch it back for STACK_GLOBAL."""
    for put, get in ((b"q\x00", b"h\x00"), (b"r\x00\x00\x00\x00", b"j\x00\x00\x00\x00")):
        data = b"\x80\x04\x8c\x02os" + put + b"0" + get + b"\x8c\x06system\x93."
        assert "STACK_GLOBAL" in {op.name for op, _, _ in pickletools.genops(data)}
        assert globals_in(data) == [Global("os.system", len(data) - 2, "")]


@pytest.mark.parametrize(("data", "names"), [
    (b"\x80\x04\x8c\x02osccollections\nOrderedDict\n\x8c\x06system\x93.",
     ["collections.OrderedDict", "<a name built at run time>"]),
    (b"\x80\x04\x8c\x02os\x8c\x01a\x8c\x01b\x93\x8c\x06system\x93.", ["a.b", "<a name built at run time>"]),
    (b"\x80\x04\x8c\x02osN\x8c\x06system\x93.", ["<a name built at run time>"]),
])
def test_what_a_global_pushes_keeps_its_place_on_the_stack(data, names):
    """STACK_GLOBAL pairs the two items on top: after a global's object, 'system' and that object
    are no module and name (pickle itself fails on them), whatever string lies below."""
    assert [g.name for g in globals_in(data)] == names


def test_a_blocked_module_is_refused_even_when_the_user_allows_its_global():
    name = f"{os.system.__module__}.system"  # posix.system: torch blocks the module whatever the allowlist
    with torch.serialization.safe_globals([os.system]):
        assert not weights_only_allows(name)
        assert not _torch_allows(name)


def test_a_global_at_the_first_byte_is_at_offset_0():
    data = pickle.dumps(collections.OrderedDict, protocol=0)
    assert data.startswith(b"c")
    assert globals_in(data, base=5) == [Global("collections.OrderedDict", 5, "")]


def test_bytes_after_the_pickles_that_read_as_opcodes_are_not_walked():
    """A legacy file's raw storage bytes follow its pickles; bytes that happen to spell a GLOBAL are
    no pickle (the next pickle must start with PROTO)."""
    one = pickle.dumps(collections.OrderedDict, protocol=2)
    assert [g.name for g in globals_in(one + b"cos\nsystem\n.")] == ["collections.OrderedDict"]


def test_the_first_refused_global_counts_from_the_start_of_the_source_by_default():
    data = pickle.dumps([collections.OrderedDict, os.path.join], protocol=2)
    assert first_refused(data).offset == _where(data)[1]
