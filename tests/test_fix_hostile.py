"""``tiecheck fix`` against hostile folders and races: what it copies, publishes, replaces and keeps.

A fixed folder is meant to be published; everything fix copies into it must be a regular file of
the input folder, never what a link points at elsewhere. Two runs must not both publish one
output, ``--force`` replaces only what fix wrote, stale temporaries of dead runs are cleaned, and
the copy keeps the input's permissions.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import tiecheck.repair as repair
from tiecheck.cli.main import main
from tiecheck.errors import TiecheckError
from tiecheck.repair import fix
from tiecheck.repair.write import _copy_range, clear_stale, copy_regular, discard, rename_noreplace

from support.checkpoints import llama_config, llama_tensors, sharded_head_copy, snapshot, write_safetensors

pytest.importorskip("transformers")

# The module: the package's attribute `write` is the function of that name.
write_module = importlib.import_module("tiecheck.repair.write")


def _hf_folder(folder: Path) -> Path:
    """A tiny Llama folder whose head is an equal copy of the embedding (TC016: fix re-ties it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(llama_config()))
    write_safetensors(folder / "model.safetensors", _head_copy())
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    return folder


def _head_copy() -> dict:
    """A tiny Llama's tensors with the head an equal copy of the embedding."""
    tensors = llama_tensors()
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return tensors


def _fixed_single(tmp_path: Path) -> tuple[Path, Path]:
    """An input file and its fixed copy, published by fix (a record beside it says so)."""
    src = write_safetensors(tmp_path / "in.safetensors", _head_copy())
    out = tmp_path / "out.safetensors"
    assert fix(src, out, tie=["lm_head.weight=model.embed_tokens.weight"]).verified
    return src, out


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
    (lambda d, secret: os.symlink("gone.json", d / "tokenizer.json"),
     r"'tokenizer.json' .* it is a broken symbolic link \(to .*gone.json\)"),
    (lambda d, secret: ((d / "sub").mkdir(), os.symlink("sub", d / "zlink")),
     r"'zlink' .* it is a symbolic link to a folder, not to a regular file"),
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


def _renameat2() -> bool:
    return getattr(ctypes.CDLL(None), "renameat2", None) is not None


def _kernel(monkeypatch, errno_: int | None) -> None:
    """rename_noreplace's C library: without renameat2 (None), or with one that fails with ``errno_``."""

    def renameat2(*args) -> int:
        ctypes.set_errno(errno_)
        return -1

    library = SimpleNamespace() if errno_ is None else SimpleNamespace(renameat2=renameat2)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **kw: library)


@pytest.mark.parametrize("kernel", [
    pytest.param("renameat2", marks=pytest.mark.skipif(not _renameat2(), reason="no renameat2 in this C library")),
    "no renameat2", "ENOSYS", "EINVAL"])
def test_rename_noreplace_refuses_an_existing_file_or_folder(tmp_path, monkeypatch, kernel):
    """With renameat2, and where the C library, the kernel or the filesystem lacks it (a hard link
    for a file, a check then a rename for a folder): an existing name is refused, a free one taken."""
    if kernel != "renameat2":
        _kernel(monkeypatch, None if kernel == "no renameat2" else getattr(errno, kernel))
    monkeypatch.chdir(tmp_path)  # relative paths: renameat2 resolves them from the working folder (AT_FDCWD)
    src_file, src_dir = Path("a"), Path("d")
    src_file.write_text("new")
    src_dir.mkdir()
    for src in (src_file, src_dir):
        dst = Path(f"{src.name}-dst")
        dst.mkdir()  # empty: os.rename would silently replace it with a folder
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
        assert src.exists()
        assert dst.is_dir()
        dst.rmdir()
        rename_noreplace(src, dst)
        assert dst.exists()
        assert not src.exists()


def test_rename_noreplace_without_renameat2_links_a_file_whatever_a_check_saw(tmp_path, monkeypatch):
    """The file fallback is a hard link, which fails on an existing name by itself: no window
    between a check and a rename in which another run's file would be replaced."""
    _kernel(monkeypatch, None)
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_text("new")
    dst.write_text("published by another run")
    monkeypatch.setattr(os.path, "lexists", lambda p: False)  # any check made first sees the name free
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    monkeypatch.undo()
    assert dst.read_text() == "published by another run"
    assert src.read_text() == "new"


def test_rename_noreplace_raises_the_kernels_other_errors_rather_than_retrying_without_noreplace(tmp_path,
                                                                                                monkeypatch):
    _kernel(monkeypatch, errno.EXDEV)
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_text("new")
    with pytest.raises(OSError, match="Invalid cross-device link") as caught:
        rename_noreplace(src, dst)
    assert caught.value.errno == errno.EXDEV
    assert caught.value.filename == str(src)
    assert src.exists()
    assert not dst.exists()


@pytest.mark.skipif(not _renameat2(), reason="no renameat2 in this C library")
def test_rename_noreplace_refuses_a_folder_that_appears_after_the_name_was_seen_free(tmp_path, monkeypatch):
    """Where the kernel has it, the rename itself refuses an existing name (RENAME_NOREPLACE): no
    window between a check and the rename in which another run's empty folder would be replaced."""
    src, dst = tmp_path / "d", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()  # empty: os.rename would replace it
    monkeypatch.setattr(os.path, "lexists", lambda p: False)  # any check made first sees the name free
    with pytest.raises(FileExistsError) as caught:
        rename_noreplace(src, dst)
    monkeypatch.undo()
    assert caught.value.filename == str(dst)
    assert src.is_dir()
    assert dst.is_dir()


def test_clear_stale_leaves_what_is_not_a_dead_runs_temporary(tmp_path, monkeypatch):
    """Not a PID, this run's own, or a PID of another user's live process (kill answers EPERM):
    left; only a dead run's temporary is removed."""
    mine = tmp_path / f".out.tiecheck-tmp-{os.getpid()}"
    odd = tmp_path / ".out.tiecheck-tmp-backup"
    other_user = tmp_path / ".out.tiecheck-old-4242"
    dead = tmp_path / ".out.tiecheck-tmp-4243"
    for p in (mine, odd, other_user, dead):
        p.write_text("")

    def kill(pid, sig):
        assert sig == 0, "a signal sent to another process"  # 0: only asks whether it exists
        raise PermissionError(errno.EPERM, "not permitted") if pid == 4242 else ProcessLookupError(errno.ESRCH, "")

    monkeypatch.setattr(os, "kill", kill)
    notes = clear_stale(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, odd.name, other_user.name])
    assert notes == [f"removed {dead}, a temporary output left by a run (PID 4243) that no longer exists",
                     f"left {other_user}: a temporary output of a run whose PID 4242 is still alive (delete it if "
                     f"that run is gone)"]


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

def test_the_copy_keeps_the_inputs_mode(tmp_path):
    """A 0600 input is fixed into 0600 files (issue: fix rewrote a 0600 file as 0644)."""
    tensors = _head_copy()
    single = write_safetensors(tmp_path / "single.safetensors", tensors)
    os.chmod(single, 0o600)
    out_file = tmp_path / "fixed.safetensors"
    assert fix(single, out_file, tie=["lm_head.weight=model.embed_tokens.weight"]).verified
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(("file_mode", "folder_mode"), [(0o600, 0o700), (0o640, 0o750)])
def test_a_folders_copy_keeps_its_modes(hf, tmp_path, file_mode, folder_mode):
    """0600 files in a 0700 folder stay private; 0640 files in a 0750 folder show that the copy's
    modes are the input's, not the writer's 0600 files and mkdir's 0700 folder."""
    for p in hf.iterdir():
        os.chmod(p, file_mode)
    os.chmod(hf, folder_mode)
    out = tmp_path / "fixed"
    assert fix(hf, out).verified
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == \
        {p.name: file_mode for p in hf.iterdir()}


def test_a_torch_save_copy_is_written_into_a_file_only_its_owner_can_read(tmp_path, monkeypatch):
    """torch.save would create its file with the umask's mode (0644: readable by all while the
    weights are written); it is handed a file made 0600 first, and the input's mode comes at the end."""
    emb = torch.arange(32.0).view(8, 4)
    src = tmp_path / "in.pt"
    torch.save({"emb.weight": emb, "head.weight": emb.clone()}, src)
    os.chmod(src, 0o644)
    modes = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        modes.append(stat.S_IMODE(os.stat(f).st_mode))  # before a byte is written
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out.pt"
    assert fix(src, out).verified
    assert modes == [0o600]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_an_output_in_a_folder_that_does_not_exist_is_refused_in_one_line(hf, tmp_path):
    out = tmp_path / "missing" / "out"
    res = _fix_cli(hf, out)
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1, res.output
    assert f"folder {out.parent} does not exist" in res.stderr
    assert not out.parent.exists()


# -- what --force replaces -------------------------------------------------------------------------

def test_force_never_replaces_an_output_folder_the_input_lies_in(hf, tmp_path):
    """Fixing a file of fix's own output folder back into that folder would replace the folder,
    and the input with it."""
    out = tmp_path / "fixed"
    assert fix(hf, out).verified
    inner = out / "model.safetensors"
    before = snapshot(out)
    with pytest.raises(TiecheckError, match=f"the input {re.escape(str(inner))} lies inside it"):
        fix(inner, out, force=True)
    assert snapshot(out) == before


def test_force_never_replaces_an_output_that_is_the_input_under_another_name(tmp_path):
    """A hard link to fix's own output, given as the input: the same file, whatever its name."""
    _, out = _fixed_single(tmp_path)
    link = tmp_path / "link.safetensors"
    os.link(out, link)
    with pytest.raises(TiecheckError, match=f"it is the input {re.escape(str(link))}"):
        fix(link, out, force=True)


def test_force_does_not_trust_a_record_over_64_kib(tmp_path):
    """fix reads at most 64 KiB of the record beside an output: a longer one is not its own, and
    --force refuses to replace what it describes."""
    src, out = _fixed_single(tmp_path)
    marker = tmp_path / ".out.safetensors.fixed-by-tiecheck"
    record = json.loads(marker.read_text())
    record["input"] += " " * (64 << 10)  # still the output's record, but longer than fix reads
    marker.write_text(json.dumps(record))
    with pytest.raises(TiecheckError, match="is not an output of tiecheck fix"):
        fix(src, out, force=True)


def test_force_never_replaces_an_output_changed_while_the_copy_was_written(hf, tmp_path, monkeypatch):
    """Checked before writing and again before replacing: another program's edit meanwhile stays."""
    out = tmp_path / "out"
    assert fix(hf, out).verified
    original = repair.verify

    def verify_while_someone_edits(*args, **kwargs):
        checks = original(*args, **kwargs)
        (out / "notes.txt").write_text("mine")  # the folder changed since fix wrote it
        return checks

    monkeypatch.setattr(repair, "verify", verify_while_someone_edits)
    with pytest.raises(TiecheckError, match="changed while the fixed copy was written; nothing was replaced"):
        fix(hf, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.tiecheck-*"))


def test_force_leaves_no_trace_of_the_output_it_replaced(hf, tmp_path):
    out = tmp_path / "out"
    assert fix(hf, out).verified
    assert fix(hf, out, force=True).verified
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "out", ".out.fixed-by-tiecheck"])


# -- what is copied, and how -------------------------------------------------------------------------

def test_a_folder_beside_blobs_that_is_not_a_cache_snapshot_copies_no_link_into_them(tmp_path):
    """Only <repo>/snapshots/<rev> may link into <repo>/blobs: elsewhere a folder two levels under
    one named blobs gets no such licence."""
    (tmp_path / "blobs").mkdir()
    secret = tmp_path / "blobs" / "secret"
    secret.write_text("hf_TOKEN")
    folder = _hf_folder(tmp_path / "models" / "in")
    os.symlink(os.path.relpath(secret, folder), folder / "tokenizer.json")
    res = _fix_cli(folder, tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert re.search(r"'tokenizer.json' .* symbolic link to .*secret", res.stderr), res.stderr
    _nothing_written(tmp_path, tmp_path / "out")


def test_files_in_subfolders_are_copied_with_their_mode_and_times(hf, tmp_path):
    sub = hf / "tokenizer"
    (sub / "extra" / "deep").mkdir(parents=True)
    (sub / "vocab.json").write_text('{"a": 0}')
    (sub / "merges.txt").write_text("a b")
    (sub / "extra" / "deep" / "notes.md").write_text("# notes")
    os.chmod(sub / "vocab.json", 0o640)
    os.utime(sub / "vocab.json", ns=(1_000_000_000, 2_000_000_000))
    out = tmp_path / "out"
    assert fix(hf, out).verified
    copied = (out / "tokenizer" / "vocab.json").stat()
    assert (out / "tokenizer" / "vocab.json").read_text() == '{"a": 0}'
    assert (out / "tokenizer" / "merges.txt").read_text() == "a b"
    assert (out / "tokenizer" / "extra" / "deep" / "notes.md").read_text() == "# notes"
    assert stat.S_IMODE(copied.st_mode) == 0o640
    assert copied.st_mtime_ns == 2_000_000_000


def test_copy_regular_refuses_what_is_no_longer_a_regular_file_and_closes_what_it_opened(tmp_path):
    """copied_files looked at a regular file; by the time it is copied a FIFO stands there (opened
    without waiting: O_NONBLOCK)."""
    fifo = tmp_path / "merges.txt"
    os.mkfifo(fifo)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(TiecheckError, match=r"merges\.txt: refusing to copy it: it is no longer a regular file"):
        copy_regular(str(fifo), tmp_path / "out" / "merges.txt", str(fifo))
    assert not (tmp_path / "out").exists()
    src = tmp_path / "a.txt"
    src.write_text("a")
    copy_regular(str(src), tmp_path / "b.txt", str(src))
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_without_copy_file_range_the_bytes_are_read_and_written(tmp_path, monkeypatch):
    """Another filesystem, or a kernel without copy_file_range: plain reads and writes, the same copy."""
    tensors = _head_copy()
    src = write_safetensors(tmp_path / "in.safetensors", tensors)

    def unsupported(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    out = tmp_path / "out.safetensors"
    assert fix(src, out).verified
    loaded = load_file(out)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items() if n in loaded)
    assert set(loaded) == set(tensors) - {"lm_head.weight"}


def test_an_input_that_shrinks_while_it_is_copied_is_refused(tmp_path, monkeypatch):
    """copy_file_range copies nothing past the end of the input; the reads and writes that follow
    find it short, and say so rather than write a copy with a hole."""
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(bytes(range(10)))
    dst.write_bytes(b"")
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        _copy_range(fin.fileno(), fout.fileno(), 4, 4, 0)  # within the file: copied
        with pytest.raises(TiecheckError, match="short read at byte 10: the input changed while it was read"):
            _copy_range(fin.fileno(), fout.fileno(), 6, 8, 4)  # 4 bytes then the end: it shrank
    assert dst.read_bytes()[:8] == bytes([4, 5, 6, 7, 6, 7, 8, 9])


def test_a_sharded_copy_keeps_the_shards_modes_and_their_folders(tmp_path):
    """Without config.json the index is the target: the modes come from the folder that holds it."""
    index = sharded_head_copy(tmp_path / "in", rows=8, shards=2)
    for p in index.parent.iterdir():
        os.chmod(p, 0o644 if p == index else 0o640)
    os.chmod(index.parent, 0o750)
    out = tmp_path / "out"
    assert fix(index, out).verified
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == \
        {p.name: 0o644 if p == index else 0o640 for p in index.parent.iterdir()}


def test_a_file_is_never_its_own_output_even_forced(tmp_path):
    tensors = _head_copy()
    src = write_safetensors(tmp_path / "in.safetensors", tensors)
    before = src.read_bytes()
    with pytest.raises(TiecheckError, match="it is the input; fix never writes in place, choose another path"):
        fix(src, src, force=True)
    assert src.read_bytes() == before


@pytest.mark.parametrize("layout", ["folder", "index"])
def test_a_folders_copy_is_written_in_a_folder_only_its_owner_can_enter(hf, tmp_path, monkeypatch, layout):
    """The weights and copied files are written before their modes are set: until then no one
    else may even look into the temporary folder."""
    target = hf if layout == "folder" else sharded_head_copy(tmp_path / "shards", rows=8, shards=2)
    os.chmod(target if layout == "folder" else target.parent, 0o755)
    modes = []
    real = write_module.write_safetensors

    def write_safetensors(header, dst, **kwargs):
        modes.append(stat.S_IMODE(dst.parent.stat().st_mode))
        return real(header, dst, **kwargs)

    monkeypatch.setattr(write_module, "write_safetensors", write_safetensors)
    out = tmp_path / "out"
    assert fix(target, out).verified
    assert modes
    assert set(modes) == {0o700}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_discarding_a_temporary_output_never_raises_over_the_error_that_stopped_the_run(tmp_path, monkeypatch):
    tmp = tmp_path / ".out.tiecheck-tmp-1"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "model.safetensors").write_bytes(b"half")

    def rmdir(path, *args, **kwargs):
        raise OSError(errno.EBUSY, "busy", str(path))

    monkeypatch.setattr(os, "rmdir", rmdir)
    discard(tmp)  # whatever it could not remove stays, and the caller's own error is the one raised
    monkeypatch.undo()
    assert not (tmp / "sub" / "model.safetensors").exists()
