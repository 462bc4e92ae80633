"""``tiecheck fix`` against hostile folders and races: what it copies, publishes, replaces and keeps.

A fixed folder is meant to be published; everything fix copies into it must be a regular file of
the input folder, never what a link points at elsewhere. Two runs must not both publish one
output, ``--force`` replaces only what fix wrote, stale temporaries of dead runs are cleaned, and
the copy keeps the input's permissions.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import tiecheck.repair as repair
from tiecheck.cli.main import main
from tiecheck.errors import TiecheckError
from tiecheck.repair import fix
from tiecheck.repair.write import rename_noreplace

from support.checkpoints import llama_config, llama_tensors, snapshot, write_safetensors

pytest.importorskip("transformers")


def _hf_folder(folder: Path) -> Path:
    """A tiny Llama folder whose head is an equal copy of the embedding (TC016: fix re-ties it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(llama_config()))
    tensors = llama_tensors()
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    return folder


@pytest.fixture
def hf(tmp_path) -> Path:
    return _hf_folder(tmp_path / "in")


def _fix_cli(target: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["fix", str(target), "-o", str(out), *extra])


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not os.path.lexists(out)
    assert not list(tmp_path.glob(f".{out.name}.*")), "a temporary output or a marker was left"


# -- what is copied --------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "expected"), [
    (lambda d, secret: os.symlink(secret, d / "tokenizer.json"), r"'tokenizer.json' .* symbolic link to .*secret"),
    (lambda d, secret: os.symlink("/dev/zero", d / "vocab.txt"), r"'vocab.txt' .* symbolic link to /dev/zero"),
    (lambda d, secret: os.mkfifo(d / "merges.txt"), r"'merges.txt' into the fixed copy: it is a FIFO"),
    (lambda d, secret: ((d / "sub").mkdir(), os.symlink(secret, d / "sub" / "t.json")),
     r"'sub/t.json' .* symbolic link to .*secret"),
    (lambda d, secret: os.symlink("..", d / "parent"), r"'parent' .* symbolic link to"),
])
def test_entries_that_are_not_the_folders_own_files_are_refused_by_name(hf, tmp_path, make, expected):
    secret = tmp_path / "home" / "secret"
    secret.parent.mkdir()
    secret.write_text("hf_TOKEN")
    make(hf, secret)
    before = snapshot(hf)
    out = tmp_path / "out"
    res = _fix_cli(hf, out)
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1, res.output
    assert re.search(expected, res.stderr), res.stderr
    _nothing_written(tmp_path, out)
    assert snapshot(hf) == before


def test_links_inside_the_folder_and_into_a_hub_cache_are_copied_as_files(tmp_path):
    """A Hugging Face cache snapshot links every file into ../../blobs; a link inside the folder is
    a file of the folder too. Both are copied as regular files with the linked bytes."""
    repo = tmp_path / "models--org--tiny"
    built = _hf_folder(tmp_path / "built")
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for p in built.iterdir():
        blob = repo / "blobs" / f"blob-{p.name}"
        p.rename(blob)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    os.symlink("tokenizer_config.json", snap / "alias.json")  # stays inside the snapshot
    out = tmp_path / "out"
    result = fix(snap, out)
    assert result.verified
    for name in ("tokenizer_config.json", "alias.json"):
        assert (out / name).is_file()
        assert not (out / name).is_symlink()
        assert (out / name).read_text() == '{"model_max_length": 32}'


# -- publishing --------------------------------------------------------------------------------------

def test_a_run_never_replaces_an_output_another_published_meanwhile(hf, tmp_path, monkeypatch):
    """Two fixes to one new -o: the one that finishes second fails and replaces nothing."""
    out = tmp_path / "out"
    original = repair.verify

    def verify_then_lose_the_race(*args, **kwargs):
        checks = original(*args, **kwargs)
        out.mkdir()  # the other run published first (an empty folder: a plain rename would replace it)
        return checks

    monkeypatch.setattr(repair, "verify", verify_then_lose_the_race)
    with pytest.raises(TiecheckError, match="appeared while the fixed copy was written"):
        fix(hf, out)
    assert out.is_dir()
    assert not any(out.iterdir())
    assert not list(tmp_path.glob(".out.tiecheck-*"))


def test_rename_noreplace_refuses_an_existing_file_or_folder(tmp_path):
    src_file, src_dir = tmp_path / "a", tmp_path / "d"
    src_file.write_text("new")
    src_dir.mkdir()
    for src in (src_file, src_dir):
        dst = tmp_path / f"{src.name}-dst"
        dst.mkdir()  # empty: os.rename would silently replace it with a folder
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
        assert src.exists()
        assert dst.is_dir()
        dst.rmdir()
        rename_noreplace(src, dst)
        assert dst.exists()
        assert not src.exists()


def test_stale_temporaries_of_dead_runs_are_removed_and_live_ones_named(hf, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.tiecheck-tmp-{dead_pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    live = tmp_path / f".out.tiecheck-tmp-{os.getppid()}"  # the process that runs the tests: alive
    live.mkdir()
    result = fix(hf, tmp_path / "out")
    assert result.verified
    assert not stale.exists()
    assert live.is_dir()
    assert any(f"removed {stale}" in n and f"PID {dead_pid}" in n for n in result.notes), result.notes
    assert any(f"left {live}" in n for n in result.notes), result.notes


# -- permissions -----------------------------------------------------------------------------------

def test_the_copy_keeps_the_inputs_mode(hf, tmp_path):
    """A 0600 input is fixed into 0600 files (issue: fix rewrote a 0600 file as 0644)."""
    tensors = llama_tensors()
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    single = write_safetensors(tmp_path / "single.safetensors", tensors)
    os.chmod(single, 0o600)
    out_file = tmp_path / "fixed.safetensors"
    assert fix(single, out_file, tie=["lm_head.weight=model.embed_tokens.weight"]).verified
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600

    for p in hf.iterdir():
        os.chmod(p, 0o600)
    os.chmod(hf, 0o700)
    out = tmp_path / "fixed"
    assert fix(hf, out).verified
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == \
        {p.name: 0o600 for p in hf.iterdir()}
