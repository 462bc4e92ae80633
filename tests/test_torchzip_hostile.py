"""The torch.save record reader (``loaders/formats/torchzip.py``) handed real torch.save files edited
as a hostile or careless hand would: each refusal names the byte of ``data.pkl`` that describes the
tensor; a user's own class that torch.load accepts (``torch.serialization.safe_globals``) is left to
torch.load; a storage used where the loop takes only names and numbers is refused on every path.
Each case asks torch what it makes of the same file."""

from __future__ import annotations

import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tiecheck.errors import TargetError
from tiecheck.loaders import load_path, load_target
from tiecheck.loaders.formats.torchzip import read_archive

from support.checkpoints import rewrite_zip_entry, tensor_pickle


@dataclass
class Settings:
    """A user's own class: pickled by NEWOBJ and BUILD, which torch.load takes once it is allowed."""

    lr: float = 0.1


def _data_pkl(path: Path) -> tuple[bytes, int]:
    """(data.pkl's bytes, where they start in the file), read from the local header as zip readers do."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
        data = z.read(info)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return data, info.header_offset + 30 + name_len + extra_len


def _ops(data: bytes) -> list[tuple[str, int]]:
    return [(op.name, pos) for op, _, pos in pickletools.genops(data)]


def _edited(tmp_path: Path, obj: dict, edit) -> Path:
    """``obj`` written by torch.save, its data.pkl then passed through ``edit`` (bytes -> bytes)."""
    src, dst = tmp_path / "ok.pt", tmp_path / "edited.pt"
    torch.save(obj, src)
    data, _ = _data_pkl(src)
    edited = edit(data)
    assert edited != data
    rewrite_zip_entry(src, dst, "/data.pkl", edited)
    return dst


def _requires_grad_as_int(data: bytes) -> bytes:
    """A parameter's requires_grad (NEWTRUE, the only one in the pickle) written as the int 1."""
    at = [pos for name, pos in _ops(data) if name == "NEWTRUE"]
    assert len(at) == 1
    return data[:at[0]] + b"K\x01" + data[at[0] + 1:]


def _dtype_as_a_name(data: bytes) -> bytes:
    """A v3 record's dtype (the global torch.float8_e4m3fn) written as the string naming it."""
    name = b"float8_e4m3fn"
    assert data.count(b"ctorch\n" + name + b"\n") == 1
    return data.replace(b"ctorch\n" + name + b"\n", b"X" + struct.pack("<I", len(name)) + name)


def _tensor_record(size: tuple, stride: tuple):
    return lambda data: tensor_pickle(size, stride)


@pytest.mark.parametrize(("obj", "edit", "torch_says", "says"), [
    ({"w": torch.ones(4)}, _tensor_record((-1,), (1,)), "numel: integer multiplication overflow",
     "of the wrong type or out of range"),
    ({"w": torch.ones(4)}, _tensor_record((2 ** 62, 4), (4, 1)), "numel: integer multiplication overflow",
     "more than torch can count"),
    ({"w": torch.ones(4)}, _tensor_record((2 ** 61,), (1,)), "Storage size calculation overflowed",
     "reaching past any storage torch can address"),
    ({"w": torch.ones(4).to(torch.float8_e4m3fn)}, _dtype_as_a_name, "must be torch.dtype, not str",
     "a typed tensor record without a dtype"),
    ({"w": torch.nn.Parameter(torch.ones(4))}, _requires_grad_as_int, "must be bool, not int",
     "a parameter that is not a tensor record"),
], ids=["negative size", "numel overflow", "past addressable", "v3 dtype as a name", "parameter"])
def test_a_tensor_record_refused_names_the_byte_of_its_reduce(tmp_path, obj, edit, torch_says, says):
    """The builders refuse without knowing where they are; the refusal names the REDUCE that called
    them (the last one of a one-tensor pickle), counted from the file's first byte."""
    path = _edited(tmp_path, obj, edit)
    data, start = _data_pkl(path)
    reduce_at = [pos for name, pos in _ops(data) if name == "REDUCE"][-1]
    with pytest.raises((RuntimeError, TypeError), match=torch_says):
        torch.load(path, weights_only=True)
    with pytest.raises(TargetError, match=says) as e:
        read_archive(str(path))
    assert f"(data.pkl, byte {start + reduce_at:,} of the file)" in str(e.value)


def test_a_users_allowed_class_made_by_newobj_and_build_is_left_to_torch_load(tmp_path):
    """A class the user allowed (``torch.serialization.safe_globals``) is made by NEWOBJ and given its
    state by BUILD: torch.load takes it; the reader builds neither, so it leaves the file to torch.load,
    on the records path and on the whole-file path, and refuses it when it is not allowed."""
    path = tmp_path / "settings.pt"
    torch.save({"w": torch.arange(4.0), "settings": Settings(lr=0.5)}, path)
    data, _ = _data_pkl(path)
    assert {"NEWOBJ", "BUILD"} <= {name for name, _ in _ops(data)}
    with torch.serialization.safe_globals([Settings]):
        want = torch.load(path, weights_only=True)
        assert want["settings"] == Settings(lr=0.5)
        assert read_archive(str(path)) is None
        for whole in (False, True):
            got = load_path(path, whole=whole).tensors
            assert list(got) == ["w"]
            assert torch.equal(got["w"], want["w"])
    with pytest.raises(TargetError, match=rf"refused to unpickle the global '{__name__}.Settings'"):
        load_target(str(path))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_a_storage_used_as_a_dict_key_is_refused_on_every_path(tmp_path):
    """torch.load reads a dict keyed by a storage; the loop takes names and numbers as keys only, so the
    records path, the whole-file vet and a storage of a type the reader does not build refuse it alike."""
    keyed, qkeyed = tmp_path / "keyed.pt", tmp_path / "qkeyed.pt"
    torch.save({"w": torch.arange(4.0), "by": {torch.ones(2).untyped_storage(): 1}}, keyed)
    assert list(torch.load(keyed, weights_only=True)["by"].values()) == [1]
    says = "as a dict key; tiecheck reads dicts keyed by names and integers"
    for whole in (False, True):
        with pytest.raises(TargetError, match=says):
            load_path(keyed, whole=whole)
    q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    qstorage = torch.storage.TypedStorage(wrap_storage=q.untyped_storage(), dtype=torch.qint8, _internal=True)
    torch.save({"w": torch.arange(4.0), "by": {qstorage: 1}}, qkeyed)
    data, _ = _data_pkl(qkeyed)
    assert b"torch\nQInt8Storage\n" in data  # a storage type the reader leaves to torch.load
    assert list(torch.load(qkeyed, weights_only=True)["by"].values()) == [1]
    with pytest.raises(TargetError, match=says):
        read_archive(str(qkeyed))


def _sparse_zip(path: Path, name: str, size: int) -> None:
    """A zip of one stored record of ``size`` zero bytes, written as a hole (no disk blocks, no memory)."""
    nb = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, 0, size, size, len(nb), 0) + nb
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, 0, size, size, len(nb),
                          0, 0, 0, 0, 0, 0) + nb
    with open(path, "wb") as f:
        f.write(local)
        f.seek(len(local) + size)
        f.write(central)
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + size, 0))


def test_a_stored_data_pkl_over_a_gibibyte_is_refused_before_it_is_read(tmp_path):
    """A data.pkl of 100,000 tensors is about 12 MB: one stored past 1 GiB is refused from its
    declared size, before a byte of it is read into memory."""
    path = tmp_path / "huge.pt"
    _sparse_zip(path, "huge/data.pkl", (1 << 30) + 1)
    with zipfile.ZipFile(path) as z:
        assert z.getinfo("huge/data.pkl").file_size == (1 << 30) + 1
    with pytest.raises(TargetError, match=r"'huge/data.pkl' \(local header at byte 0\) declares 1,073,741,825 bytes; "
                                          r"tiecheck reads at most 1,073,741,824 for it"):
        read_archive(str(path))


def test_one_storage_named_twice_with_two_sizes_is_refused_on_every_path(tmp_path):
    """The second tensor's storage key '1' respelled '0': torch.load keeps the first storage it made
    for a key and hands it to the second id whatever size that claims, so ``b`` reads ``a``'s bytes.
    The records path and the whole-file vet refuse the two claims alike."""
    def second_key_as_first(data: bytes) -> bytes:
        one = b"X\x01\x00\x00\x001"  # BINUNICODE '1'
        assert data.count(one) == 1
        return data.replace(one, b"X\x01\x00\x00\x000")

    path = _edited(tmp_path, {"a": torch.arange(4.0), "b": torch.full((2,), 7.0)}, second_key_as_first)
    assert torch.equal(torch.load(path, weights_only=True)["b"], torch.tensor([0.0, 1.0]))
    for whole in (False, True):
        with pytest.raises(TargetError, match="names storage '0' twice, with different types or sizes"):
            load_path(path, whole=whole)


def test_a_damaged_pickle_is_named_by_its_damage_even_with_a_refused_global_after_it(tmp_path):
    """The first BINGET of ``b`` respelled to fetch memo entry 250, which no BINPUT stored: torch's
    unpickler fails there (a KeyError) before it reaches the global ``print`` after it, and the
    reader names the damage too, not the global."""
    def bogus_memo_get(data: bytes) -> bytes:
        at = next(pos for name, pos in _ops(data) if name == "BINGET")
        return data[:at + 1] + bytes([250]) + data[at + 2:]

    path = _edited(tmp_path, {"a": torch.arange(4.0), "b": torch.ones(2), "x": print}, bogus_memo_get)
    assert "__builtin__ print" in [arg for op, arg, _ in pickletools.genops(_data_pkl(path)[0]) if op.name == "GLOBAL"]
    with pytest.raises(KeyError, match="250"):
        torch.load(path, weights_only=True)
    with pytest.raises(TargetError, match=r"data.pkl is truncated or corrupt: .* not a pickle torch.save writes$") as e:
        load_target(str(path))
    assert "print" not in str(e.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
def test_a_refused_global_behind_a_refused_frame_is_named_at_its_own_byte(tmp_path):
    """torch.save with protocol 4 frames the pickle: torch's weights-only unpickler refuses the FRAME
    (opcode 149) at byte 2, and so does the loop; the refusal names the global ``print`` that the
    frame holds instead, at the byte of its STACK_GLOBAL, not the frame's."""
    path = tmp_path / "framed.pt"
    torch.save({"w": torch.arange(4.0), "x": print}, path, pickle_protocol=4)
    data, start = _data_pkl(path)
    ops = list(pickletools.genops(data))
    assert ops[1][0].name == "FRAME"
    at = next(pos for i, (op, _, pos) in enumerate(ops) if op.name == "STACK_GLOBAL" and ops[i - 2][1] == "print")
    with pytest.raises(pickle.UnpicklingError, match="Unsupported operand 149"):
        torch.load(path, weights_only=True)
    with pytest.raises(TargetError, match=rf"refused to unpickle the global 'builtins.print' \(data.pkl, byte "
                                          rf"{start + at:,} of the file\)"):
        load_target(str(path))


def test_a_byteorder_record_longer_than_any_byte_order_is_refused_before_it_is_read(tmp_path):
    """torch.save writes ``little`` or ``big``; torch.load refuses anything else. A byteorder record
    of 17 bytes is refused from its declared size, one past the 16 the reader reads for it."""
    src, bad = tmp_path / "ok.pt", tmp_path / "byteorder.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    rewrite_zip_entry(src, bad, "/byteorder", b"little" + b" " * 11)
    with pytest.raises(ValueError, match="Unknown endianness type"):
        torch.load(bad, weights_only=True)
    with pytest.raises(TargetError, match=r"byteorder' \(local header at byte [\d,]+\) declares 17 bytes; tiecheck "
                                          r"reads at most 16 for it"):
        load_target(str(bad))
