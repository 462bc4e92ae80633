"""Writers of the corrected copy, one per layout, and the output's protections.

Never in place: the output may not be the input, lie inside it, or hold it; an existing output
is replaced only with ``force``. Everything is written under a temporary name in the output's
parent folder and renamed at the end, so an interrupted run leaves no half-written output under
the final name (a folder is written whole as a temporary folder, then renamed).

safetensors files are written here rather than with ``safetensors.torch.save_file``: that
function serialises every tensor to bytes in memory first, so fixing a 16 GB file would need
16 GB of RAM. The header is built as the library builds it (JSON, ``__metadata__`` of strings,
``data_offsets`` relative to the data section, padded with spaces to 8 bytes), and each tensor's
bytes are copied from the input file range by range (``os.copy_file_range``, in the kernel where
the filesystem allows), so memory stays bounded whatever the file size. Verification then reads
the output with the safetensors library itself.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from tiecheck.errors import TiecheckError
from tiecheck.loaders.safetensors_files import DTYPES, Header, read_header
from tiecheck.loaders.torchfile import strip_wrapper_prefixes
from tiecheck.repair.plan import HF_FOLDER, SAFETENSORS, SHARDED, TORCH, Plan
from tiecheck.report.safewrite import UnsafeOutputError, input_paths, is_inside

CHUNK = 64 << 20  # bytes per copy call: bounds memory on the fallback path
# Read only by tests: seconds the writer pauses after its first shard (the fault test kills it there).
PAUSE_ENV = "TIECHECK_TEST_PAUSE_AFTER_SHARD"


# -- the output's protections ---------------------------------------------------------------

def check_output(target: Path, output: Path, *, force: bool) -> None:
    """Refuse an output that would touch the input, or an existing one without ``force``."""
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
    if (output.exists() or output.is_symlink()) and not force:
        raise UnsafeOutputError(f"{output} exists; choose another path, or pass --force to replace it")
    if not output.parent.is_dir():
        raise TiecheckError(f"-o {output}: folder {output.parent} does not exist")


def temp_path(output: Path) -> Path:
    return output.parent / f".{output.name}.tiecheck-tmp-{os.getpid()}"


def publish(tmp: Path, output: Path) -> None:
    """Rename the finished temporary output to its final name, replacing an old output (--force)."""
    if output.exists() or output.is_symlink():
        old = output.parent / f".{output.name}.tiecheck-old-{os.getpid()}"
        os.replace(output, old)  # the previous complete output stays whole until the new one is in place
        os.replace(tmp, output)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, output)


def discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()


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


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: Mapping[str, str]) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, begin, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


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
    head = header_bytes(entries, metadata)
    sizes = {}
    with open(header.path, "rb") as fin, open(dst, "wb") as fout:
        fout.write(head)
        fout.flush()
        base = len(head)
        for (name, source), (_, _, _, begin, end) in zip(wanted, entries):
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


def _kept(plan: Plan, name: str) -> str:
    """Follow drops to the stored name (A dropped for B, B dropped for C: A -> C)."""
    seen = set()
    while name in plan.drop and name not in seen:
        seen.add(name)
        name = plan.drop[name]
    return name


def write_single(plan: Plan, src: Path, dst: Path) -> None:
    header = read_header(src)
    drop = set(plan.drop) & set(header.entries)
    aliases = {a: _kept(plan, a) for a in plan.drop} if plan.layout == SAFETENSORS else {}
    copy = {n: _kept(plan, s) for n, s in plan.copy.items()}
    write_safetensors(header, dst, drop=drop, copy=copy, metadata=_metadata(header, plan, aliases))


def _pause_after_first_shard() -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def write_sharded(plan: Plan, index_path: Path, dst_folder: Path) -> list[str]:
    """Each shard rewritten in turn (bounded memory), and a new index. Returns the files written."""
    index = json.loads(index_path.read_text(encoding="utf-8"))
    weight_map: dict[str, str] = dict(index["weight_map"])
    copy = {n: _kept(plan, s) for n, s in plan.copy.items()}
    new_map = {n: s for n, s in weight_map.items() if n not in plan.drop}
    for n, s in copy.items():
        new_map[n] = weight_map[s]
    written, total = [], 0
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
        written.append(shard)
        if i == 0:
            _pause_after_first_shard()
    out = {k: v for k, v in index.items() if k not in ("weight_map", "metadata")}
    meta = dict(index.get("metadata") or {})
    meta["total_size"] = total
    out = {"metadata": meta, **out, "weight_map": dict(sorted(new_map.items()))}
    (dst_folder / index_path.name).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return written + [index_path.name]


# -- Hugging Face folders ---------------------------------------------------------------------

def _set_path(cfg: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = cfg
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


def write_hf_folder(plan: Plan, folder: Path, weights: Path, dst: Path) -> None:
    """The weights rewritten, config.json updated, every other file copied unchanged."""
    dst.mkdir()
    if weights.name.endswith(".index.json"):
        skip = set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values()) | {weights.name}
        write_sharded(plan, weights, dst)
    else:
        skip = {weights.name}
        write_single(plan, weights, dst / weights.name)
    cfg_path = folder / "config.json"
    if plan.config:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for k, v in plan.config.items():
            _set_path(cfg, k, v)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        skip.add("config.json")
    for p in sorted(folder.iterdir()):
        if p.name in skip:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, symlinks=True)
        else:
            shutil.copy2(p, dst / p.name, follow_symlinks=True)


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
        put(n, get(_kept(plan, s)).clone())
    for n in plan.drop:
        put(n, get(_kept(plan, n)))
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
        tmp.mkdir()
        write_sharded(plan, target, tmp)
    elif plan.layout == SAFETENSORS:
        write_single(plan, target, tmp)
    elif plan.layout == TORCH:
        write_torch(plan, torch_obj, state_key, tmp)
    else:  # pragma: no cover - make_plan only returns the layouts above
        raise TiecheckError(f"no writer for {plan.layout}")
