"""The torch.load path of the torch.save reader: legacy (non-zip) files, ``whole`` loads (the
object kept for ``fix``), trusted pickles, and the one-line errors of each, on files made with
torch.save and edited by hand where a hostile one is needed."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import sys
import tarfile
import types
import zipfile
from fractions import Fraction

import pytest
import torch
from click.testing import CliRunner

import tiecheck.loaders
from tiecheck.cli import main
from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.loaders.formats import torchfile
from tiecheck.loaders.formats.torchfile import load_payload, read_records, torch_load

from support.checkpoints import rewrite_zip_entry
from support.hf import EMB, tiny_llama

LEGACY_NOTE = "legacy (non-zip) torch.save format: loaded without memory mapping"
TRUSTED_NOTE = "loaded with --trust-pickle: the file's pickled objects were allowed to run code"
FLOAT_KEY = "uses a float as a dict key"


def _one_error_line(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if not line.startswith("tiecheck: warning:")]
    assert len(errors) == 1, res.output
    assert errors[0].startswith("tiecheck: error:"), res.output
    return errors[0]


def test_a_legacy_file_loads_whole_without_mmap_and_says_so(tmp_path):
    """Each storage of 128 float32s is written after the five pickles as its element count, 8 bytes
    little-endian: the first byte is 0x80, a pickle's first byte, and must not be read as a sixth pickle."""
    path = tmp_path / "legacy.pt"
    w = torch.arange(128.0)
    torch.save({"w": w, "b": torch.full((128,), 2.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(torch.load(path, weights_only=True)["w"], w)  # what torch reads
    sub = tiecheck.loaders.load_path(path)
    assert sub.source.notes == [LEGACY_NOTE]
    assert sub.source.format == "torch.save state dict"
    assert torch.equal(sub.tensors["w"], w)
    assert torch.equal(sub.checkpoint["w"], w)  # torch.load's object, kept


@pytest.mark.parametrize("zipped", [False, True], ids=["legacy", "zip whole"])
def test_what_the_pickle_loop_refuses_is_refused_before_torch_load(tmp_path, zipped):
    """A dict keyed by a float: torch.load reads it, the loop that vets the pickle first refuses it
    (a key whose hash the file chooses), whether the file is legacy or a zip read whole."""
    path = tmp_path / "floatkey.pt"
    torch.save({"w": torch.arange(4.0), "meta": {1.5: 2}}, path, _use_new_zipfile_serialization=zipped)
    assert torch.load(path, weights_only=True)["meta"] == {1.5: 2}  # torch takes it
    with pytest.raises(TargetError, match=FLOAT_KEY):
        tiecheck.loaders.load_path(path, whole=zipped)
    line = _one_error_line(["inspect", str(path)])
    assert FLOAT_KEY in line
    # torch.save wrote it and torch.load reads it: the refusal says the bound is tiecheck's, and how to pass it.
    assert line.endswith("a bound kept on files that are not trusted. If you trust this file, rerun with "
                         "--trust-pickle")
    assert "not a pickle torch.save writes" not in line
    assert list(tiecheck.loaders.load_path(path, whole=zipped, trust_pickle=True).tensors) == ["w"]


def test_a_legacy_file_naming_a_refused_global_is_refused_with_its_offset(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"w": torch.arange(4.0), "share": Fraction(1, 3)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedPickleError, match=r"the global 'fractions\.Fraction' "
                                                   r"\(the pickle, byte [0-9,]+ of the file\)"):
        tiecheck.loaders.load_path(path)
    sub = tiecheck.loaders.load_path(path, trust_pickle=True)
    assert sub.source.notes == [LEGACY_NOTE, TRUSTED_NOTE, "skipped 1 non-tensor entry"]
    assert list(sub.tensors) == ["w"]


def test_a_file_that_is_a_tar_as_well_is_refused_before_torch_extracts_it(tmp_path):
    """A tar whose first member's name starts with a pickle's first bytes: torch.load takes it for a
    torch < 0.4 file, extracted into a temporary folder and unpickled only without weights_only."""
    path = tmp_path / "tar.pt"
    with tarfile.open(path, mode="w:", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo("\x80\x02storages")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(RuntimeError, match=r"legacy \.tar format"):  # what torch says
        torch.load(path, weights_only=True)
    with pytest.raises(UntrustedPickleError, match=r"a tar-format torch\.save file \(torch < 0\.4\)"):
        tiecheck.loaders.load_path(path)


def test_a_container_that_holds_itself_is_refused_when_read_whole(tmp_path):
    path = tmp_path / "cycle.pt"
    loop: list = []
    loop.append(loop)
    torch.save({"w": torch.arange(4.0), "loop": loop}, path)
    assert torch.load(path, weights_only=True)["loop"][0] is not None  # torch builds it
    with pytest.raises(TargetError, match=r"cycle\.pt: the pickle holds a container that contains itself"):
        tiecheck.loaders.load_path(path, whole=True)


@pytest.fixture
def module_on_path(tmp_path, monkeypatch):
    """A module ``tc_saved_classes`` importable from ``tmp_path``, removed from sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tc_saved_classes.py").write_text("class Box:\n    pass\n")
    monkeypatch.delitem(sys.modules, "tc_saved_classes", raising=False)
    import tc_saved_classes  # noqa: PLC0415 - made by this fixture, after the path is set
    yield tc_saved_classes
    sys.modules.pop("tc_saved_classes", None)


@pytest.mark.parametrize("gone", ["module", "class"])
def test_a_trusted_pickle_whose_class_is_gone_says_the_file_is_fine(tmp_path, module_on_path, monkeypatch, gone):
    path = tmp_path / "box.pt"
    torch.save({"w": torch.arange(4.0), "box": module_on_path.Box()}, path)
    if gone == "module":
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
        monkeypatch.delitem(sys.modules, "tc_saved_classes")
        raised, said = ModuleNotFoundError, ("pickles a class from module 'tc_saved_classes', which is not on the "
                                             "import path; run from the folder that holds tc_saved_classes (or set "
                                             "PYTHONPATH)")
    else:
        monkeypatch.delattr(module_on_path, "Box")
        raised, said = AttributeError, ("pickles tc_saved_classes.Box, which module 'tc_saved_classes' on the import "
                                        "path does not define (renamed or moved?); import the right version of it")
    with pytest.raises(raised):  # what torch raises
        torch.load(path, weights_only=False)
    line = _one_error_line(["inspect", "--trust-pickle", str(path)])
    assert line == f"tiecheck: error: {path}: the file is fine, but it {said}, or save the state_dict() instead"


def test_a_trusted_pickle_failing_otherwise_is_corrupt_with_its_cause(tmp_path, module_on_path, monkeypatch):
    """A class whose unpickling raises (its module replaced by one whose attribute access fails): no
    class is missing, so the file is called unreadable, with the exception's type and the first 300
    characters of its first line."""
    path = tmp_path / "box.pt"
    torch.save({"w": torch.arange(4.0), "box": module_on_path.Box()}, path)

    class Exploding(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError(f"cannot make {name} " + "x" * 400 + "\nsecond line")

    monkeypatch.setitem(sys.modules, "tc_saved_classes", Exploding("tc_saved_classes"))
    line = _one_error_line(["inspect", "--trust-pickle", str(path)])
    assert line == (f"tiecheck: error: {path}: not a readable torch.save file, truncated or corrupt "
                    f"(RuntimeError: cannot make Box {'x' * 284})")


def test_a_pickled_module_is_the_subject_and_one_module_in_a_checkpoint_too(tmp_path):
    lin = torch.nn.Linear(2, 2)
    alone, inside, two = tmp_path / "alone.pt", tmp_path / "inside.pt", tmp_path / "two.pt"
    torch.save(lin, alone)
    torch.save({"model": lin, "epoch": 3}, inside)
    torch.save({"a": lin, "b": torch.nn.Linear(2, 2), "sd": lin.state_dict()}, two)
    for path, key in ((alone, None), (inside, "model")):
        sub = tiecheck.loaders.load_path(path, trust_pickle=True)
        assert sub.module is not None
        assert (sub.source.format, sub.source.key) == ("torch.save (pickled nn.Module)", key)
        assert sub.source.notes == [TRUSTED_NOTE]
        assert sorted(sub.tensors) == ["bias", "weight"]
    sub = tiecheck.loaders.load_path(two, trust_pickle=True)  # two modules: neither is the model
    assert sub.module is None
    assert (sub.source.format, sub.source.key) == ("torch.save training checkpoint", "sd")


def _edited_pickle(src, dst, edit) -> None:
    """``src`` with its data.pkl replaced by ``edit(data.pkl)``."""
    with zipfile.ZipFile(src) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    rewrite_zip_entry(src, dst, "/data.pkl", edit(data))


@pytest.mark.parametrize("zipped", [False, True], ids=["legacy", "zip whole"])
def test_a_storage_id_torch_refuses_is_refused_in_torchs_words(tmp_path, zipped):
    """The id's type name 'storage' respelled: the vet leaves an id it cannot read to torch.load (the
    records reader refuses it), whose weights-only refusal is the line, for a legacy file or a zip read whole."""
    src, bad = tmp_path / "ok.pt", tmp_path / "pid.pt"
    torch.save({"w": torch.arange(4.0)}, src, _use_new_zipfile_serialization=zipped)

    def respell(data: bytes) -> bytes:
        storage = b"X\x07\x00\x00\x00storage"  # BINUNICODE 'storage', written once and memoized
        assert data.count(storage) == 1
        return data.replace(storage, storage[:-1] + b"s")

    if zipped:
        _edited_pickle(src, bad, respell)
    else:
        bad.write_bytes(respell(src.read_bytes()))
    with pytest.raises(pickle.UnpicklingError, match="Only persistent_load of storage is allowed"):  # torch
        torch.load(bad, weights_only=True)
    with pytest.raises(UntrustedPickleError) as e:
        tiecheck.loaders.load_path(bad, whole=zipped)
    assert str(e.value) == (f"{bad}: refused to unpickle what the pickle asks for (Only persistent_load of storage is "
                            f"allowed, but got <class 'str'>): a weights-only load accepts tensors and plain containers "
                            f"only, and unpickling anything else can run arbitrary code. If you trust this file, rerun "
                            f"with --trust-pickle")


@pytest.mark.parametrize("whole", [False, True])
def test_a_pickle_torch_cannot_finish_is_corrupt_in_torchs_words(tmp_path, whole):
    """bytes (pickled by protocol 2 as a call of ``_codecs.encode``) given a state by BUILD: every global
    is one a weights-only load allows, so only torch.load, reading it, says what is wrong."""
    src, bad = tmp_path / "ok.pt", tmp_path / "build.pt"
    torch.save({"w": torch.arange(4.0), "b": b"abc"}, src)

    def build_bytes(data: bytes) -> bytes:
        ops = list(pickletools.genops(data))
        first = next(i for i, (op, arg, _) in enumerate(ops) if op.name == "GLOBAL" and arg == "_codecs encode")
        reduce = next(pos for op, _, pos in ops[first:] if op.name == "REDUCE")
        return data[:reduce + 1] + b"}b" + data[reduce + 1:]  # EMPTY_DICT, BUILD

    _edited_pickle(src, bad, build_bytes)
    with pytest.raises(pickle.UnpicklingError, match="Can only build"):  # what torch says
        torch.load(bad, weights_only=True)
    with pytest.raises(TargetError) as e:
        tiecheck.loaders.load_path(bad, whole=whole)
    assert str(e.value) == (f"{bad}: not a readable torch.save file, truncated or corrupt (Can only build Tensor, "
                            f"Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got <class 'bytes'>)")


def test_a_payload_that_is_no_torch_save_file_names_the_global_torch_refuses(tmp_path):
    """A record of another archive (a .pt2 weight stored as a pickle) holding a protocol-1 pickle: neither
    a zip nor a legacy file, so torch.load reads it as a legacy file and refuses its global; the line
    names the global and its byte in the record, as for a file."""
    payload = pickle.dumps(Fraction(1, 3), protocol=1)
    with pytest.raises(pickle.UnpicklingError, match=r"Unsupported global: GLOBAL fractions\.Fraction"):  # torch
        torch.load(io.BytesIO(payload), weights_only=True)
    with pytest.raises(UntrustedPickleError) as e:
        load_payload(payload, "model.pt2 (record data/weights/weight_0)")
    assert str(e.value) == ("model.pt2 (record data/weights/weight_0): refused to unpickle the global "
                            "'fractions.Fraction' (byte 0 of the record): a weights-only load accepts tensors and "
                            "plain containers only, and unpickling anything else can run arbitrary code. If you trust "
                            "this file, rerun with --trust-pickle")


@pytest.mark.parametrize("whole", [False, True])
def test_a_record_outside_the_archive_s_root_folder_is_refused_as_torch_refuses_it(tmp_path, whole):
    """torch.load reads only archives whose every record is inside one root folder; one more record
    beside it is refused in one line whichever way the file is read."""
    path = tmp_path / "two-roots.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("other/notes.txt", b"hello")
    with pytest.raises(RuntimeError, match="not in a subdirectory"):  # what torch says
        torch.load(path, weights_only=True)
    with pytest.raises(TargetError) as e:
        tiecheck.loaders.load_path(path, whole=whole)
    assert str(e.value) == (f"{path}: not a torch.save archive: expected one root folder holding data.pkl, found "
                            f"2 folder(s) and 1 data.pkl record(s)")
    assert _one_error_line(["inspect", str(path)]) == f"tiecheck: error: {e.value}"


def test_a_legacy_payload_is_vetted_and_loaded_from_memory():
    legacy = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_payload(legacy.getvalue(), "record")["w"], torch.arange(4.0))
    legacy = io.BytesIO()
    torch.save({"w": torch.arange(4.0), "meta": {1.5: 2}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(TargetError, match=f"^record: the pickle {FLOAT_KEY}"):
        load_payload(legacy.getvalue(), "record")


def test_a_payload_of_no_pickle_is_unreadable_in_torchs_words():
    """Bytes that start like no torch.save file (the second byte is a legacy pickle's protocol, the
    first is not its 0x80) are left to torch.load, which reads them as a legacy file and stops at
    the first byte."""
    payload = b"\x01\x02\x03\x04"
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # what torch says
        torch.load(io.BytesIO(payload), weights_only=True)
    with pytest.raises(TargetError) as e:
        load_payload(payload, "record")
    assert str(e.value) == "record: not a readable torch.save file, truncated or corrupt (Unsupported operand 1)"


def test_a_legacy_file_cut_after_its_object_is_left_to_torch_to_name(tmp_path):
    """Four of the five pickles, whole: the vet stops where the file does, and torch.load's EOFError
    (which carries no message) is the line."""
    src, cut = tmp_path / "legacy.pt", tmp_path / "cut.pt"
    torch.save({"w": torch.arange(4.0)}, src, _use_new_zipfile_serialization=False)
    raw, end = src.read_bytes(), 0
    for _ in range(4):  # magic number, protocol version, system info, the object
        end += list(pickletools.genops(io.BytesIO(raw[end:])))[-1][2] + 1
    cut.write_bytes(raw[:end])
    with pytest.raises(EOFError):  # what torch raises
        torch.load(cut, weights_only=True)
    with pytest.raises(TargetError) as e:
        tiecheck.loaders.load_path(cut)
    assert str(e.value) == f"{cut}: not a readable torch.save file, truncated or corrupt (EOFError)"


@pytest.mark.parametrize("whole", [False, True])
def test_two_storage_records_sharing_bytes_are_refused(tmp_path, whole):
    """The directory entry of data/1 pointed at data/0's local header: torch.load(mmap=True) gives
    ``v`` the bytes of ``w`` without a word; every record is checked before any is read."""
    src, bad = tmp_path / "ok.pt", tmp_path / "overlap.pt"
    torch.save({"w": torch.arange(4.0), "v": torch.full((4,), 7.0)}, src)
    with zipfile.ZipFile(src) as z:
        first = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        second = next(i for i in z.infolist() if i.filename.endswith("/data/1")).filename.encode()
    raw = bytearray(src.read_bytes())
    entry = raw.index(b"PK\x01\x02")
    while raw[entry + 46:entry + 46 + len(second)] != second:  # the central directory entry of data/1
        entry = raw.index(b"PK\x01\x02", entry + 4)
    raw[entry + 42:entry + 46] = struct.pack("<I", first.header_offset)
    bad.write_bytes(raw)
    assert torch.equal(torch.load(bad, mmap=True, weights_only=True)["v"], torch.arange(4.0))  # what torch does
    with pytest.raises(TargetError, match=r"record '[^']+/data/1' \(local header at byte [0-9,]+\) overlaps record "
                                          r"'[^']+/data/0'"):
        tiecheck.loaders.load_path(bad, whole=whole)


def test_a_file_that_cannot_be_opened_is_one_line_or_left_to_the_caller(tmp_path):
    """``torch_load`` (a shard of an index, read whole) says the file cannot be read; ``read_records``
    leaves a file it cannot open to the caller, whose own open then says so."""
    gone = tmp_path / "gone.pt"
    with pytest.raises(TargetError) as e:
        torch_load(str(gone))
    assert str(e.value) == f"{gone}: cannot read (No such file or directory)"
    assert read_records(str(gone)) is None


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), ValueError("cannot mmap an empty file")],
                         ids=["io error", "emptied"])
def test_a_legacy_file_that_cannot_be_mapped_for_its_vetting_is_one_line(tmp_path, monkeypatch, error):
    """The legacy vetting maps the file after its first bytes were read: a file emptied in between (Python's
    ``mmap`` refuses an empty file with this ValueError) or a failing disk is one line, not a traceback."""
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)

    def fail(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(torchfile.mmap, "mmap", fail)
    with pytest.raises(TargetError) as e:
        torch_load(str(path))
    assert str(e.value) == f"{path}: cannot read ({error.args[-1]})"


def test_a_hugging_face_folder_s_bin_file_is_read_by_records_not_by_torch_load(tmp_path, monkeypatch):
    """A folder's ``pytorch_model.bin`` is read as a lone .bin is, by the records reader with tensors made on
    access; torch.load (the whole object, which only ``fix`` needs to write a file again) is not called."""
    llama = tiny_llama(tie=False)
    llama.save_pretrained(tmp_path)  # transformers 5 writes safetensors; the .bin as transformers 4 wrote it
    (tmp_path / "model.safetensors").unlink()
    torch.save(llama.state_dict(), tmp_path / "pytorch_model.bin")

    def no_torch_load(*_args, **_kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torchfile, "torch_load", no_torch_load)
    sub = tiecheck.loaders.load_path(tmp_path)
    assert sub.checkpoint is None
    assert torch.equal(sub.tensors[EMB], llama.state_dict()[EMB])
    assert sub.file_spans[EMB].path == str(tmp_path / "pytorch_model.bin")
