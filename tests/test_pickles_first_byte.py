"""A global at a pickle's first byte (``loaders.pickles``): named at offset 0, as ``pickletools``
places it, whether the name can be read or is built at run time, and in the refusal of an archive
whose ``data.pkl`` starts with it."""

from __future__ import annotations

import pickle
import pickletools
import zipfile

import pytest
import torch

from tiecheck.errors import UntrustedPickleError
from tiecheck.loaders.formats.torchzip import read_archive
from tiecheck.loaders.pickles import Global, first_refused, globals_in

from support.checkpoints import rewrite_zip_entry

BUILT = "<a name built at run time>"
HEAD = b"\x93."  # STACK_GLOBAL on an empty stack, then STOP: no PROTO, so it can only be a first pickle


def test_a_name_built_at_run_time_at_the_first_byte_is_at_offset_0():
    assert [(op.name, pos) for op, _, pos in pickletools.genops(HEAD)] == [("STACK_GLOBAL", 0), ("STOP", 1)]
    with pytest.raises(pickle.UnpicklingError, match="stack underflow"):
        pickle.loads(HEAD)
    assert globals_in(HEAD) == [Global(BUILT, 0, "")]
    assert globals_in(HEAD, base=5) == [Global(BUILT, 5, "")]
    assert first_refused(HEAD) == Global(BUILT, 0, "")


def _data_start(path, suffix: str) -> int:
    """Where the stored bytes of the record ending with ``suffix`` start in the file (after its local header)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    at = info.header_offset
    return at + 30 + int.from_bytes(raw[at + 26:at + 28], "little") + int.from_bytes(raw[at + 28:at + 30], "little")


def test_an_archive_whose_data_pkl_starts_with_the_global_names_that_byte(tmp_path):
    """torch refuses the record by the opcode's number; the reader names the global at the record's first byte."""
    src, path = tmp_path / "ok.pt", tmp_path / "edited.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    rewrite_zip_entry(src, path, "/data.pkl", HEAD)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported operand 147"):
        torch.load(path, weights_only=True)
    start = _data_start(path, "/data.pkl")
    assert path.read_bytes()[start:start + len(HEAD)] == HEAD
    with pytest.raises(UntrustedPickleError) as e:
        read_archive(str(path))
    assert str(e.value).startswith(f"{path}: refused to unpickle the global {BUILT!r} (data.pkl, byte {start:,} "
                                   f"of the file)")
