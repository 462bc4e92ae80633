"""What a scan reads: every checkpoint under a folder tree, or the targets a list names.

A checkpoint folder (a Hugging Face folder with its weights, a DCP checkpoint, a PEFT adapter)
is one target and is not walked into; elsewhere every file whose first bytes are a checkpoint
format (``detect.sniff_file``) is one, except the shards a weights index in the same folder
names (the index is the target). Hidden folders, symlinked folders (a loop could walk forever)
and the ``blobs`` of a Hugging Face cache (each snapshot is read instead) are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tiecheck.errors import TiecheckError
from tiecheck.loaders import detect

WEIGHT_KINDS = frozenset({detect.TORCH_SAVE, detect.TORCH_SAVE_LEGACY, detect.TORCHSCRIPT, detect.PT2,
                          detect.SAFETENSORS, detect.WEIGHTS_INDEX, detect.ONNX, detect.GGUF})


def discover(root: Path) -> Iterator[str]:
    """Every checkpoint under ``root``, in a stable order (folders sorted, files sorted), as paths
    that start with ``root`` as given.

    Raises:
        TiecheckError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise TiecheckError(f"{root}: not a folder; give a folder to scan, or a list of targets with --from")
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        kinds = _kinds(here, filenames)
        if _is_checkpoint_folder(here, kinds):
            yield str(here)
            dirnames.clear()
            continue
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not _is_cache_blobs(here, n)
                             and not (here / n).is_symlink())
        shards: set[str] = set()
        for name, kind in kinds.items():
            if kind == detect.WEIGHTS_INDEX:
                index = detect.read_weights_index(here / name)
                if index is not None:
                    shards.update(v for v in index["weight_map"].values() if isinstance(v, str))
        for name in sorted(kinds):
            if kinds[name] in WEIGHT_KINDS and name not in shards:
                yield str(here / name)


def _kinds(folder: Path, names: list[str]) -> dict[str, str | None]:
    """The format of each regular, non-empty file of a folder (None for anything else)."""
    out: dict[str, str | None] = {}
    for name in names:
        p = folder / name
        try:
            out[name] = detect.sniff_file(p) if p.is_file() and p.stat().st_size > 0 else None
        except (OSError, TiecheckError):
            out[name] = None  # unreadable here: not a checkpoint this scan can name
    return out


def _is_checkpoint_folder(folder: Path, kinds: dict[str, str | None]) -> bool:
    if detect.is_dcp_folder(folder) or detect.is_peft_folder(folder):
        return True
    return detect.is_hf_folder(folder) and any(k in WEIGHT_KINDS for k in kinds.values())


def _is_cache_blobs(parent: Path, name: str) -> bool:
    """A Hugging Face cache repository's ``blobs`` (beside ``snapshots``): its snapshots are the models."""
    return name == "blobs" and (parent / "snapshots").is_dir()


def read_list(path: Path) -> list[str]:
    """The targets a list file names, one per line; blank lines and ``#`` comments are skipped.

    Raises:
        TiecheckError: the file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TiecheckError(f"{path}: cannot read the list of targets ({getattr(e, 'strerror', None) or e})") from e
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out
