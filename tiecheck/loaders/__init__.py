"""Loaders: turn a target (path, spec, bundled name, module or state dict) into a Subject.

One small module per family; each returns the same ``Subject`` so nothing downstream knows
where the tensors came from. Formats are recognised by content, not by file extension.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tiecheck.errors import TargetError
from tiecheck.subject import Source, Subject


def from_module(module, target: str | None = None, fmt: str = "nn.Module", notes=None, config=None) -> Subject:
    from tiecheck.facts import module_tensors

    return Subject(tensors=module_tensors(module), module=module, config=config,
                   source=Source(target=target or type(module).__name__, format=fmt, notes=list(notes or [])))


def from_mapping(obj: Mapping, key: str | None = None, target: str = "<state dict>") -> Subject:
    from tiecheck.loaders.torchfile import pick_state

    tensors, used, notes = pick_state(obj, key, target)
    fmt = "training checkpoint" if used else "state dict"
    return Subject(tensors=tensors, source=Source(target=target, format=fmt, key=used, notes=notes))


def load_path(path: Path, *, key: str | None = None, trust_pickle: bool = False) -> Subject:
    from tiecheck.loaders import torchfile

    target = str(path)
    if path.is_dir():
        return load_folder(path, key=key, trust_pickle=trust_pickle)
    if not path.is_file():
        raise TargetError(f"{target}: not a regular file")
    try:
        size = path.stat().st_size
        kind = torchfile.sniff(path)
    except OSError as e:
        raise TargetError(f"{target}: cannot read ({e.strerror or e})") from e
    if size == 0:
        raise TargetError(f"{target}: the file is empty")
    if kind is not None:
        return torchfile.load_torch_file(target, key=key, trust_pickle=trust_pickle)
    raise TargetError(f"{target}: not a recognised checkpoint (expected a torch.save file); "
                      f"the first bytes match no known format")


def load_folder(path: Path, *, key: str | None = None, trust_pickle: bool = False) -> Subject:
    from tiecheck.loaders import torchfile

    files = sorted(p for p in path.iterdir() if p.is_file() and p.stat().st_size > 0)
    weights = [p for p in files if torchfile.sniff(p) is not None]
    if not weights:
        raise TargetError(f"{path}: the folder holds no weight files (looked for torch.save files)")
    if len(weights) > 1:
        names = ", ".join(p.name for p in weights[:6])
        raise TargetError(f"{path}: the folder holds several weight files ({names}); name one of them")
    sub = load_path(weights[0], key=key, trust_pickle=trust_pickle)
    sub.source.notes.insert(0, f"read {weights[0].name} from the folder")
    return sub


def load_target(target: Any, *, key: str | None = None, trust_pickle: bool = False) -> Subject:
    """Whatever the user pointed at, as a Subject. Raises TiecheckError for bad input."""
    from tiecheck.loaders import bundled, spec

    if isinstance(target, Subject):
        return target
    try:
        from torch import nn

        if isinstance(target, nn.Module):
            return from_module(target)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(target, Mapping):
        return from_mapping(target, key=key)
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if not isinstance(target, str):
        raise TargetError(f"cannot analyse a {type(target).__name__}: pass an nn.Module, a state dict, a path, "
                          f"a bundled model name or a 'file.py:factory' spec")
    if not target.strip():
        raise TargetError("empty target: pass a path, a bundled model name or a 'file.py:factory' spec")
    # A path that exists wins over a name or a spec.
    if os.path.exists(target) or os.path.islink(target):
        return load_path(Path(target), key=key, trust_pickle=trust_pickle)
    if spec.looks_like_spec(target):
        module = spec.load_module_spec(target)
        return from_module(module, target=target, fmt="python spec")
    if bundled.is_bundled(target):
        return bundled.load_bundled(target)
    hint = ""
    names = bundled.names()
    if names:
        hint = f"; bundled models: {', '.join(names)}"
    raise TargetError(f"{target}: no such file or folder, bundled model or Python spec "
                      f"(file.py:factory or package.module:factory){hint}")
