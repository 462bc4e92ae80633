"""Writers of the corrected copy, one per layout, and the output's protections.

Never in place: the output may not be the input, lie inside it, or hold it; an existing output
is replaced only with ``force``, and only when fix wrote it (a marker beside it says so).
Everything is written under a temporary name in the output's parent folder, readable by its
owner only, and renamed at the end without replacing anything, so an interrupted run leaves no
half-written output under the final name and two runs cannot both publish one new output. A
folder's other files are copied only when they are regular files in the folder (links leaving
it are refused by name), and the copy keeps the input's permissions.

safetensors files are written here rather than with ``safetensors.torch.save_file``: that
function serialises every tensor to bytes in memory first, so fixing a 16 GB file would need
16 GB of RAM. The header is built as the library builds it (JSON, ``__metadata__`` of strings,
``data_offsets`` relative to the data section, padded with spaces to 8 bytes), and each tensor's
bytes are copied from the input file range by range (``os.copy_file_range``, in the kernel where
the filesystem allows), so memory stays bounded whatever the file size. Verification then reads
the output with the safetensors library itself.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tiecheck.errors import TargetError, TiecheckError
from tiecheck.loaders.formats.safetensors_files import DTYPES, Header, read_header
from tiecheck.loaders.formats.torchfile import strip_wrapper_prefixes
from tiecheck.loaders.hf_config_edits import set_path
from tiecheck.repair.actions import Plan
from tiecheck.repair.layouts import HF_FOLDER, SAFETENSORS, SHARDED, TORCH
from tiecheck.report.safewrite import UnsafeOutputError, input_paths, is_inside

CHUNK = 64 << 20  # bytes per copy call: bounds memory on the fallback path
# Read only by tests: seconds the writer pauses after its first shard (the fault test kills it there).
PAUSE_ENV = "TIECHECK_TEST_PAUSE_AFTER_SHARD"


# -- the output's protections ---------------------------------------------------------------

MARKER = ".fixed-by-tiecheck"  # suffix of the record beside each output fix publishes: what --force may replace
_MARKER_LIMIT = 64 << 10


def marker_path(output: Path) -> Path:
    """Where fix records that it wrote ``output``: a hidden file beside it, never inside it."""
    return output.parent / f".{output.name}{MARKER}"


def _identity(p: Path) -> dict[str, int]:
    """What a marker records of an output: replaced, moved or changed (a file's bytes, a folder's
    entries) since, it no longer matches."""
    st = os.lstat(p)
    return {"device": st.st_dev, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns,
            "size": st.st_size if stat.S_ISREG(st.st_mode) else -1}


def written_by_fix(output: Path) -> bool:
    """Whether ``output`` is, unchanged, an output ``fix`` published (its marker says so)."""
    marker = marker_path(output)
    try:
        with open(marker, "rb") as fh:
            record = json.loads(fh.read(_MARKER_LIMIT))
        return isinstance(record, dict) and record.get("output") == output.name and \
            record.get("identity") == _identity(output)
    except (OSError, ValueError, RecursionError):
        return False


def write_marker(output: Path, target: Path) -> None:
    """Record, beside the output just published, that fix wrote it (atomically: a temporary, renamed)."""
    marker = marker_path(output)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
    record = {"written_by": "tiecheck fix", "output": output.name, "input": str(target),
              "identity": _identity(output)}
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def check_output(target: Path, output: Path, *, force: bool) -> None:
    """Refuse an output that would touch the input, or an existing one unless ``force`` and fix wrote it."""
    protect = input_paths([target])
    if target.is_file() and target.suffix == ".json":  # an index: its shards are inputs too
        protect.append(target.parent)
    for p in protect:
        if is_inside(output, p) and (p.is_dir() or output.resolve() == p.resolve()):
            what = "the input" if output.resolve() == p.resolve() else f"inside the input folder {p}"
            raise UnsafeOutputError(f"refusing to write the fixed copy to {output}: it is {what}; fix never writes "
                                    f"in place, choose another path")
        if output.exists() and output.is_dir() and is_inside(p, output):
            raise UnsafeOutputError(f"refusing to write the fixed copy to {output}: the input {p} lies inside it")
        if output.exists() and p.exists() and os.path.samefile(p, output):
            raise UnsafeOutputError(f"refusing to write the fixed copy to {output}: it is the input {p}")
    if output.exists() or output.is_symlink():
        if not force:
            raise UnsafeOutputError(f"{output} exists; choose another path, or pass --force to replace it")
        if not written_by_fix(output):
            raise UnsafeOutputError(f"{output} exists and is not an output of tiecheck fix, or changed since fix "
                                    f"wrote it (its record {marker_path(output).name} is missing or disagrees); "
                                    f"--force replaces only fix's own outputs: move or delete it yourself")
    if not output.parent.is_dir():
        raise TiecheckError(f"-o {output}: folder {output.parent} does not exist")


def temp_path(output: Path) -> Path:
    return output.parent / f".{output.name}.tiecheck-tmp-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale(output: Path) -> list[str]:
    """Remove the temporary outputs that runs which no longer exist left beside ``output`` (a run
    killed mid-write leaves ``.NAME.tiecheck-tmp-PID``); say which were removed and which were left
    (their run is still going, or the PID was reused)."""
    notes = []
    for kind in ("tmp", "old"):
        for p in sorted(output.parent.glob(f".{glob.escape(output.name)}.tiecheck-{kind}-*")):
            pid = p.name.rsplit("-", 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            if _alive(int(pid)):
                notes.append(f"left {p}: a temporary output of a run whose PID {pid} is still alive (delete it if "
                             f"that run is gone)")
                continue
            discard(p)
            notes.append(f"removed {p}, a temporary output left by a run (PID {pid}) that no longer exists")
    return notes


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, atomically (Linux ``renameat2`` with
    ``RENAME_NOREPLACE``; elsewhere a hard link for a file, and for a folder a check then a rename).

    Raises:
        FileExistsError: ``dst`` exists (another run published first).
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # the filesystem or kernel lacks it: the fallbacks below
            raise OSError(err, os.strerror(err), str(src))
    if src.is_dir() and not src.is_symlink():
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)  # fails when dst exists
        os.unlink(src)


def publish(tmp: Path, output: Path, target: Path, *, force: bool) -> None:
    """Rename the finished temporary output to its final name, and record that fix wrote it.

    Without ``force`` the name must still be free: of two runs writing the same new output, the
    second fails instead of replacing the first. With ``force`` only an output fix wrote is
    replaced, and the previous one stays whole until the new one is in place.

    Raises:
        UnsafeOutputError: the output appeared meanwhile, or is no longer one fix wrote.
    """
    old = None
    if force and (output.exists() or output.is_symlink()):
        if not written_by_fix(output):
            raise UnsafeOutputError(f"{output} changed while the fixed copy was written; nothing was replaced")
        old = output.parent / f".{output.name}.tiecheck-old-{os.getpid()}"
        os.replace(output, old)
    try:
        rename_noreplace(tmp, output)
    except FileExistsError:
        raise UnsafeOutputError(f"{output} appeared while the fixed copy was written (another run?); nothing was "
                                f"replaced: choose another path") from None
    finally:
        if old is not None:
            discard(old)
    write_marker(output, target)


def discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()


def create_private(path: Path) -> None:
    """An empty file only its owner can read: the writers fill it (``open(..., "wb")`` keeps the
    mode), and the input's mode is given to it once it is complete."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def keep_modes(layout: str, target: Path, weights: Path, tmp: Path) -> None:
    """Give the written copy the input's permissions: a file its file's, a folder its folder's, and
    each file written in it the mode of the input file of that name (a 0600 input stays 0600). A
    folder keeps its owner's read, write and search bits, so the copy can be replaced later (a
    read-only cache folder would otherwise make a copy --force cannot remove)."""
    if layout in (SAFETENSORS, TORCH):
        shutil.copymode(target, tmp)
        return
    src_folder = weights.parent if layout != HF_FOLDER else target
    for p in tmp.iterdir():
        src = src_folder / p.name
        if p.is_file() and not p.is_symlink() and src.is_file():
            shutil.copymode(src, p)
    os.chmod(tmp, stat.S_IMODE(os.stat(src_folder).st_mode) | stat.S_IRWXU)


# -- the files of a folder that are copied ------------------------------------------------------

def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _cache_blobs(folder: Path) -> str | None:
    """A Hugging Face cache snapshot (``<repo>/snapshots/<rev>``) links every file into ``<repo>/blobs``."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return os.path.realpath(real.parent.parent / "blobs")
    return None


def copied_files(folder: Path, skip: set[str]) -> list[tuple[str, str]]:
    """(path relative to ``folder``, the regular file it holds) for every file a folder fix copies.

    Only regular files are copied. A symbolic link is followed only when it stays in the folder
    (or, for a Hugging Face cache snapshot, in its repository's ``blobs``): a link elsewhere (a
    token file in the home folder) would publish that file with the model. Links to folders,
    FIFOs, devices and sockets are refused too; each refusal names the entry.

    Raises:
        TargetError: an entry that is not copied, by name.
    """
    root = os.path.realpath(folder)
    blobs = _cache_blobs(folder)
    out: list[tuple[str, str]] = []

    def refuse(rel: str, why: str) -> TargetError:
        return TargetError(f"{folder}: refusing to copy {rel!r} into the fixed copy: {why}")

    def walk(rel_dir: str) -> None:
        with os.scandir(os.path.join(folder, rel_dir)) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
                if not rel_dir and entry.name in skip:
                    continue
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if not (_inside(real, root) or (blobs is not None and _inside(real, blobs))):
                        raise refuse(rel, f"it is a symbolic link to {real}, outside the folder; copying it would "
                                          f"publish that file with the model. Replace the link with the file it "
                                          f"stands for, or remove it")
                    try:
                        st = os.stat(real)
                    except OSError:
                        raise refuse(rel, f"it is a broken symbolic link (to {real})") from None
                    if not stat.S_ISREG(st.st_mode):
                        raise refuse(rel, f"it is a symbolic link to {_kind(st.st_mode)}, not to a regular file")
                    out.append((rel, real))
                elif entry.is_dir(follow_symlinks=False):
                    walk(rel)
                elif entry.is_file(follow_symlinks=False):
                    out.append((rel, entry.path))
                else:
                    raise refuse(rel, f"it is {_kind(entry.stat(follow_symlinks=False).st_mode)}, not a regular file")

    walk("")
    return out


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def copy_regular(src: str, dst: Path, label: str) -> None:
    """Copy one regular file (contents, mode, times), checked again once open: never a FIFO or a
    device swapped in after ``copied_files`` looked (O_NONBLOCK: opening a FIFO does not wait)."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TargetError(f"{label}: refusing to copy it: it is no longer a regular file")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.dup(fd), "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


# -- safetensors ----------------------------------------------------------------------------

def _copy_range(src: int, dst: int, offset: int, count: int, dst_offset: int) -> None:
    done = 0
    while done < count:
        n = min(CHUNK, count - done)
        try:
            got = os.copy_file_range(src, dst, n, offset + done, dst_offset + done)
        except OSError:  # another filesystem, or a kernel without it: plain reads and writes
            got = 0
        if got <= 0:
            data = os.pread(src, n, offset + done)
            if len(data) != n:
                raise TiecheckError(f"short read at byte {offset + done:,}: the input changed while it was read")
            got = os.pwrite(dst, data, dst_offset + done)
        done += got


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: Mapping[str, str],
                 data_start_mod_page: int | None = None) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes.

    Args:
        entries: (name, dtype, shape, begin, end) of each tensor, in file order.
        metadata: the ``__metadata__`` strings.
        data_start_mod_page: where the data should start within a page (a multiple of 8); the JSON
            is padded further (the format allows trailing spaces) until it does.

    Returns:
        The header's bytes, length prefix included.
    """
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, begin, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if data_start_mod_page is not None:
        raw += b" " * ((data_start_mod_page - 8 - len(raw)) % PAGE)
    return len(raw).to_bytes(8, "little") + raw


# The kernel copies a range page by page when source and destination sit at the same offset
# within a page; shifted by anything else, os.copy_file_range runs about 2.5x slower (measured on
# ext4: 1 GiB in 0.25 s aligned, 0.63 s shifted by 4,104 bytes, as fast as shutil.copyfile aligned).
PAGE = 4096


def aligned_data_start(copies: list[tuple[int, int, int]]) -> int:
    """Where in a page the output's data should start so that most copied bytes keep their source's
    offset within a page.

    Args:
        copies: (source file offset, output offset from the data start, nbytes) of each copied range.

    Returns:
        The data start's offset within a page, a multiple of 8 (tensors stay 8-byte aligned).
    """
    weight: dict[int, int] = {}
    for src, rel, n in copies:
        r = (src - rel) % PAGE
        if r % 8 == 0:
            weight[r] = weight.get(r, 0) + n
    return max(weight, key=lambda r: (weight[r], -r)) if weight else 0


def write_safetensors(header: Header, dst: Path, *, drop: set[str], copy: Mapping[str, str],
                      metadata: Mapping[str, str]) -> dict[str, int]:
    """``header``'s file without the ``drop`` names, with ``copy`` names holding their source's bytes.

    Tensors are ordered by element size, largest first, as safetensors orders them, so every
    tensor starts at a multiple of its element size. Returns name -> data bytes written.
    """
    src_entries = header.entries
    wanted = [(n, n) for n in src_entries if n not in drop] + [(n, s) for n, s in copy.items() if n not in src_entries]
    wanted.sort(key=lambda ns: -DTYPES[src_entries[ns[1]].dtype][1])  # stable: file order within a size
    entries, pos = [], 0
    for name, source in wanted:
        e = src_entries[source]
        size = e.end - e.begin
        entries.append((name, e.dtype, e.shape, pos, pos + size))
        pos += size
    head = header_bytes(entries, metadata, aligned_data_start(
        [(header.data_start + src_entries[source].begin, begin, end - begin)
         for (_, source), (_, _, _, begin, end) in zip(wanted, entries, strict=True)]))
    sizes = {}
    # Opened without O_TRUNC ("wb" would truncate the empty file create_private made): ext4 treats
    # a truncated file as one being replaced and forces its blocks out at close (auto_da_alloc),
    # measured at 0.18-0.29 s of a 0.5 s write of 1 GiB. The size is set at the end instead.
    with open(header.path, "rb") as fin, os.fdopen(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fout:
        fout.write(head)
        fout.flush()
        base = len(head)
        for (name, source), (_, _, _, begin, end) in zip(wanted, entries, strict=True):
            e = src_entries[source]
            _copy_range(fin.fileno(), fout.fileno(), header.data_start + e.begin, end - begin, base + begin)
            sizes[name] = end - begin
        fout.truncate(base + pos)
    return sizes


def _metadata(header: Header, plan: Plan, aliases: Mapping[str, str]) -> dict[str, str]:
    """The input's metadata, alias entries the plan removes taken out, new aliases added as save_model adds them."""
    meta = {k: v for k, v in header.metadata.items() if k not in plan.unalias}
    for dropped, kept in aliases.items():
        if dropped not in meta:  # save_model: "Do not override user data"
            meta[dropped] = kept
    return meta


def write_single(plan: Plan, src: Path, dst: Path) -> None:
    header = read_header(src)
    drop = set(plan.drop) & set(header.entries)
    aliases = {a: plan.kept(a) for a in plan.drop} if plan.layout == SAFETENSORS else {}
    copy = {n: plan.kept(s) for n, s in plan.copy.items()}
    write_safetensors(header, dst, drop=drop, copy=copy, metadata=_metadata(header, plan, aliases))


def _pause_after_first_shard() -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def write_sharded(plan: Plan, index_path: Path, dst_folder: Path) -> None:
    """Each shard rewritten in turn (bounded memory), and a new index."""
    index = json.loads(index_path.read_text(encoding="utf-8"))
    weight_map: dict[str, str] = dict(index["weight_map"])
    copy = {n: plan.kept(s) for n, s in plan.copy.items()}
    new_map = {n: s for n, s in weight_map.items() if n not in plan.drop}
    for n, s in copy.items():
        new_map[n] = weight_map[s]
    total = 0
    for i, shard in enumerate(dict.fromkeys(weight_map.values())):
        header = read_header(index_path.parent / shard)
        drop = {n for n in plan.drop if weight_map.get(n) == shard}
        here_copy = {n: s for n, s in copy.items() if weight_map[s] == shard}
        if not set(header.entries) - drop and not here_copy:
            continue  # every name it held is dropped: the new index names no such shard
        # No alias map in shards: transformers re-ties from the config (make_plan ties nothing in a bare index).
        sizes = write_safetensors(header, dst_folder / shard, drop=drop, copy=here_copy,
                                  metadata=_metadata(header, plan, {}))
        total += sum(sizes.values())
        if i == 0:
            _pause_after_first_shard()
    out = {k: v for k, v in index.items() if k not in ("weight_map", "metadata")}
    meta = dict(index.get("metadata") or {})
    meta["total_size"] = total
    out = {"metadata": meta, **out, "weight_map": dict(sorted(new_map.items()))}
    (dst_folder / index_path.name).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


# -- Hugging Face folders ---------------------------------------------------------------------

def rewritten_files(plan: Plan, weights: Path) -> set[str]:
    """The names of a folder's files that fix writes itself (the weights, the index, a changed config)."""
    if weights.name.endswith(".index.json"):
        names = set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values()) | {weights.name}
    else:
        names = {weights.name}
    return names | ({"config.json"} if plan.config else set())


def write_hf_folder(plan: Plan, folder: Path, weights: Path, dst: Path) -> None:
    """The weights rewritten, config.json updated, every other regular file copied unchanged (see
    ``copied_files`` for what is refused)."""
    skip = rewritten_files(plan, weights)
    copies = copied_files(folder, skip)  # refusals come before anything is written
    dst.mkdir(mode=0o700)
    if weights.name.endswith(".index.json"):
        write_sharded(plan, weights, dst)
    else:
        write_single(plan, weights, dst / weights.name)
    cfg_path = folder / "config.json"
    if plan.config:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for k, v in plan.config.items():
            set_path(cfg, k, v)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for rel, src in copies:
        copy_regular(src, dst / rel, f"{folder / rel}")


# -- torch.save --------------------------------------------------------------------------------

def _refs(mapping: Mapping, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted name, container, key) of every tensor in a nested mapping, as the loader flattens it."""

    for k, v in mapping.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            yield name, mapping, k
        elif isinstance(v, Mapping):
            yield from _refs(v, name + ".")


def write_torch(plan: Plan, obj: Any, state_key: str | None, dst: Path) -> None:
    """The loaded object with the plan's edits, saved with ``torch.save``: one storage under both names."""


    state = obj
    for part in (state_key.split(".") if state_key else []):
        state = state[part]
    refs = {n: (c, k) for n, c, k in _refs(state)}
    named, _ = strip_wrapper_prefixes({n: n for n in refs})  # names as the report spells them -> file names
    ref = {n: refs[f] for n, f in named.items()}

    def get(n: str):
        c, k = ref[n]
        return c[k]

    def put(n: str, t) -> None:
        c, k = ref[n]
        c[k] = t

    for n in sorted(plan.clone):
        put(n, get(n).clone())
    for n, s in plan.copy.items():
        put(n, get(plan.kept(s)).clone())
    for n in plan.drop:
        put(n, get(plan.kept(n)))
    if isinstance(obj, dict):
        for k in plan.drop_keys:
            obj.pop(k, None)
    torch.save(obj, dst)


def write(plan: Plan, target: Path, weights: Path, tmp: Path, *, torch_obj: Any = None,
          state_key: str | None = None) -> None:
    """Write the corrected copy of ``target`` to ``tmp``."""
    if plan.layout == HF_FOLDER:
        write_hf_folder(plan, target, weights, tmp)
    elif plan.layout == SHARDED:
        tmp.mkdir(mode=0o700)
        write_sharded(plan, target, tmp)
    elif plan.layout == SAFETENSORS:
        create_private(tmp)
        write_single(plan, target, tmp)
    elif plan.layout == TORCH:
        create_private(tmp)
        write_torch(plan, torch_obj, state_key, tmp)
    else:  # pragma: no cover - make_plan only returns the layouts above
        raise TiecheckError(f"no writer for {plan.layout}")
    keep_modes(plan.layout, target, weights, tmp)
