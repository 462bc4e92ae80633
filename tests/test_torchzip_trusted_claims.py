"""The storage ids of a pickle the user trusts (``--trust-pickle``): read with stand-ins for its
globals, checked against their records, and a pickle the stand-ins cannot read left to torch.load."""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch
from click.testing import CliRunner

import tiecheck.loaders
from tiecheck.cli import main
from tiecheck.errors import TargetError

from support.checkpoints import rewrite_zip_entry

SHORT = r"storage '0' claims 16 bytes, but its record data/0 holds 12; the file is truncated or corrupt"


class _FromKeys:
    """An object whose pickle calls a bound method (``dict.fromkeys``, pickled as ``getattr``) and
    fills what it returns: the call's result must take the items like any other object."""

    def __reduce__(self):
        return (dict.fromkeys, (("a",),), None, None, iter([("b", 1)]))


def _shortened(src, dst) -> None:
    """``src`` with its first storage record cut from 16 bytes to 12."""
    with zipfile.ZipFile(src) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith("/data/0")))
    assert len(record) == 16
    rewrite_zip_entry(src, dst, "/data/0", record[:12])


def test_what_a_called_global_returns_is_filled_and_the_storages_are_still_checked(tmp_path):
    src, bad = tmp_path / "ok.pt", tmp_path / "short.pt"
    torch.save({"w": torch.arange(4.0), "keys": _FromKeys()}, src)
    assert torch.load(src, weights_only=False)["keys"] == {"a": None, "b": 1}  # what torch makes of it
    _shortened(src, bad)
    with pytest.raises(TargetError, match=SHORT):
        tiecheck.loaders.load_path(bad, trust_pickle=True, whole=True)


def test_a_trusted_pickle_the_stand_ins_cannot_read_is_left_to_torch_load(tmp_path):
    """A data.pkl cut short (no STOP): the stand-ins cannot read it, so torch.load says what is wrong."""
    src, bad = tmp_path / "ok.pt", tmp_path / "cut.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    with zipfile.ZipFile(src) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    rewrite_zip_entry(src, bad, "/data.pkl", data[:-1])
    with pytest.raises(EOFError, match="Ran out of input") as torch_says:  # what torch says
        torch.load(bad, weights_only=False)
    res = CliRunner().invoke(main, ["inspect", "--trust-pickle", "--no-flops", str(bad)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if "error" in line]
    assert len(errors) == 1, res.output
    assert f"({type(torch_says.value).__name__}: {torch_says.value})" in errors[0], res.output


def _with_key(src, dst, key: bytes, record: str) -> None:
    """``src`` (one storage, key '0') with the key's pickle replaced by ``key`` and data/0 renamed ``record``."""
    old = b"X\x01\x00\x00\x000q"  # BINUNICODE '0', then its memo
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(old) == 1
                data = data.replace(old, key + b"q")
            name = info.filename[:-len("0")] + record if info.filename.endswith("/data/0") else info.filename
            zout.writestr(name, data)


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize(("key", "record"), [(b"K\x00", "0"), (b"G" + struct.pack(">d", 0.5), "0.5")],
                         ids=["int key", "float key"])
def test_a_storage_named_by_a_key_that_is_not_a_str_has_its_record_checked_too(tmp_path, trusted, key, record):
    """torch.load reads the record ``data/{key}`` whatever the key's type: a hand-edited id with the
    int key 0 loads data/0, the float 0.5 data/0.5, and a short one lends the storage the next record's bytes."""
    src, edited, bad = tmp_path / "ok.pt", tmp_path / "edited.pt", tmp_path / "short.pt"
    torch.save({"w": torch.arange(4.0), "v": torch.full((4,), 7.0)}, src)
    _with_key(src, edited, key, record)
    assert torch.equal(torch.load(edited, weights_only=True)["w"], torch.arange(4.0))
    got = tiecheck.loaders.load_path(edited, trust_pickle=trusted, whole=True).checkpoint
    assert torch.equal(got["w"], torch.arange(4.0))
    with zipfile.ZipFile(edited) as z:
        short = z.read(next(n for n in z.namelist() if n.endswith(f"/data/{record}")))[:12]
    rewrite_zip_entry(edited, bad, f"/data/{record}", short)
    assert torch.load(bad, mmap=True, weights_only=True)["w"][3] != 3.0  # the next record's bytes
    with pytest.raises(TargetError, match=SHORT.replace("'0'", f"'{record}'").replace("data/0", f"data/{record}")):
        tiecheck.loaders.load_path(bad, trust_pickle=trusted, whole=True)



@pytest.mark.parametrize("trusted", [False, True])
def test_a_key_too_long_to_spell_is_refused_in_one_line(tmp_path, trusted):
    """An int key past Python's 4,300-digit conversion limit names no record torch.load can spell (its
    own ``f"data/{key}"`` raises): refused in one line, exit 2, never a traceback."""
    src, edited = tmp_path / "ok.pt", tmp_path / "huge-key.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    digits = (10**5000).to_bytes(2100, "little", signed=True)
    _with_key(src, edited, b"\x8b" + struct.pack("<I", len(digits)) + digits, "0")
    args = ["inspect", str(edited), *(["--trust-pickle"] if trusted else [])]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if not line.startswith("tiecheck: warning:")]
    assert "Traceback" not in res.output, res.output
    assert len(errors) == 1, res.output
    assert errors[0].startswith("tiecheck: error:"), res.output
