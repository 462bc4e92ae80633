"""Writing reports and snapshots without ever destroying an input.

An output path is refused when it is one of the inputs, lies inside an input folder (a
Hugging Face folder's weights, an index's shards, its config), is a Python source file (a
spec's factory), or already holds model weights of any format tiecheck reads. Writes are
atomic: a temporary file beside the destination, then a rename.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

from tiecheck.errors import TiecheckError
from tiecheck.loaders.detect import sniff_file

WRITE_CHARS = 1 << 20  # characters encoded and written at a time


class UnsafeOutputError(TiecheckError):
    """The output would overwrite an input or a file that must not be overwritten."""


def input_paths(targets: Iterable[object]) -> list[Path]:
    """The files and folders a list of targets reads: paths as given, and the file of a spec."""
    out = []
    for t in targets:
        if t is None or not isinstance(t, (str, os.PathLike)):
            continue
        text = os.fspath(t)
        if os.path.exists(text):
            out.append(Path(text))
            continue
        left, sep, _ = text.rpartition(":")
        if sep and left and os.path.exists(left):
            out.append(Path(left))
    return out


def is_inside(child: Path, folder: Path) -> bool:
    """``child`` is ``folder`` or lies under it, symlinks resolved."""
    try:
        child.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def refusal(dest: Path, protect: Iterable[object] = ()) -> str | None:
    """Why ``dest`` must not be written, or None when it may be."""
    for p in input_paths(protect):
        if p.is_dir() and is_inside(dest, p):
            return f"it lies inside the input folder {p}"
        if dest.exists() and p.exists() and os.path.samefile(p, dest):
            return f"it is the input {p}"
    if dest.exists() and dest.is_file():
        if dest.suffix == ".py":
            return "it is Python source"

        try:
            kind = sniff_file(dest)
        except (OSError, ValueError, zipfile.BadZipFile):
            kind = None
        if kind is not None:
            return f"it holds model data ({kind})"
    return None


def write_text(dest: str | os.PathLike, text: str, protect: Iterable[object] = (), *, what: str = "the output",
               make_parents: bool = False) -> None:
    """Write ``text`` to ``dest`` atomically, unless that would overwrite an input."""
    p = Path(dest)
    why = refusal(p, protect)
    if why:
        raise UnsafeOutputError(f"refusing to write {what} to {p}: {why}; choose another file")
    if p.is_dir():
        raise UnsafeOutputError(f"{p}: is a folder; give {what} a file name")
    tmp = p.with_name(f".{p.name}.tiecheck-tmp")
    try:
        if make_parents:
            p.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            # A slice at a time: the file object encodes what it is given whole, so one write would
            # hold the report as bytes beside its text (25 MB at 100,000 tensors, 250 MB at a million).
            for i in range(0, len(text), WRITE_CHARS):
                f.write(text[i:i + WRITE_CHARS])
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TiecheckError(f"{p}: cannot write {what} ({e.strerror or e})") from e
