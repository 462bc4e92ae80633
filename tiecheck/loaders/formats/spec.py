"""Python specs: ``path/to/file.py:factory`` and ``package.module:factory``.

A spec is the user's own code, so it is trusted: it is imported and run. The attribute may be
an ``nn.Module`` instance, or a function or class that returns one when called with no
arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tiecheck.errors import TargetError

_MODULE_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_ATTR_PATH = _MODULE_PATH


def project_root(start: Path) -> Path | None:
    """The folder of the nearest ``pyproject.toml`` at or above ``start``, as pytest finds its rootdir."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return None


def import_roots(*starts: Path) -> list[str]:
    """The folders a spec imports from: the current folder, then each project root above a start."""
    roots = [os.getcwd()]
    for start in (Path.cwd(), *starts):
        root = project_root(start)
        if root is not None and str(root) not in roots:
            roots.append(str(root))
    return roots


@contextmanager
def _on_path(folders: list[str]) -> Iterator[None]:
    """Put ``folders`` first on ``sys.path`` for the import, then take back those that were added."""
    added = [f for f in folders if f not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            with suppress(ValueError):
                sys.path.remove(f)


def _importable(name: str) -> bool:
    """Whether ``name``'s top-level package can be found on the current import path."""
    try:
        return importlib.util.find_spec(name.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def looks_like_spec(target: str) -> bool:
    left, sep, right = target.rpartition(":")
    if not sep or not left or not right or not _ATTR_PATH.match(right):
        return False
    return left.endswith(".py") or os.path.exists(left) or bool(_MODULE_PATH.match(left))


def _import_file(path: Path, spec_text: str):
    name = "tiecheck_user_" + re.sub(r"\W", "_", str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"{spec_text}: cannot import {path} as Python source")
    module = importlib.util.module_from_spec(spec)
    # The file's own folder (its siblings), the current folder and the project root (its package),
    # as pytest puts a test file's rootdir on the import path.
    folders = [str(path.resolve().parent), *import_roots(path.resolve().parent)]
    try:
        with _on_path(folders):
            sys.modules[name] = module
            spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise TargetError(f"{spec_text}: importing it failed: {type(e).__name__}: {_line(e)}"
                          f"{_missing_hint(e, folders)}") from e
    return module


def _missing_hint(e: BaseException, folders: list[str]) -> str:
    if not isinstance(e, ModuleNotFoundError):
        return ""
    return (f" (the import path held {', '.join(folders)} first; install the package or run from the folder "
            f"that holds it)")


def _line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else "(no message)"


def resolve_spec(spec_text: str) -> Any:
    """The object a spec names (not yet called)."""
    left, _, attr = spec_text.rpartition(":")
    # Like pytest: the current folder and the project root are on the import path, so a project's
    # own package imports without being installed. A dotted name that imports is a module even
    # where a folder of that name exists (the package's own folder, seen from the project root).
    roots = import_roots()
    with _on_path(roots):
        as_module = (not left.endswith(".py") and not os.path.isfile(left) and _MODULE_PATH.match(left) is not None
                     and _importable(left))
    if not as_module and (left.endswith(".py") or os.path.exists(left)):
        path = Path(left)
        if not path.is_file():
            raise TargetError(f"{spec_text}: no such Python file {left}")
        module = _import_file(path, spec_text)
    else:
        try:
            with _on_path(roots):
                module = importlib.import_module(left)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            raise TargetError(f"{spec_text}: cannot import module '{left}': {type(e).__name__}: {_line(e)}"
                              f"{_missing_hint(e, roots)}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise TargetError(f"{spec_text}: '{left}' has no attribute '{attr}'") from e
    return obj


def call_spec(spec_text: str, *args, **kwargs) -> Any:
    """Resolve a spec and call it, turning any failure into a one-line TargetError."""
    obj = resolve_spec(spec_text)
    if not callable(obj):
        raise TargetError(f"{spec_text}: names a {type(obj).__name__}, which cannot be called")
    try:
        return obj(*args, **kwargs)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise TargetError(f"{spec_text}: calling it raised {type(e).__name__}: {_line(e)}") from e


def load_module_spec(spec_text: str):
    """The ``nn.Module`` a spec names, or the one its factory returns."""
    # Resolving a spec stays torch-free (the CLI resolves --inputs while parsing); a module needs torch.
    from torch import nn  # noqa: PLC0415

    obj = resolve_spec(spec_text)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise TargetError(f"{spec_text}: names a {type(obj).__name__}, not an nn.Module or a factory returning one")
    result = call_spec(spec_text)
    if not isinstance(result, nn.Module):
        raise TargetError(f"{spec_text}: returned {type(result).__name__}, not a torch.nn.Module")
    return result
