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
from pathlib import Path
from typing import Any

from tiecheck.errors import TargetError

_MODULE_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_ATTR_PATH = _MODULE_PATH


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
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so the file can import its siblings
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise TargetError(f"{spec_text}: importing {path} failed: {type(e).__name__}: {_line(e)}") from e
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else "(no message)"


def resolve_spec(spec_text: str) -> Any:
    """The object a spec names (not yet called)."""
    left, _, attr = spec_text.rpartition(":")
    if left.endswith(".py") or os.path.exists(left):
        path = Path(left)
        if not path.is_file():
            raise TargetError(f"{spec_text}: no such Python file {left}")
        module = _import_file(path, spec_text)
    else:
        # Like `python -m`, look in the current folder first: a project's own package is
        # usually run from its root without being installed.
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(left)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            raise TargetError(f"{spec_text}: cannot import module '{left}': {type(e).__name__}: {_line(e)}") from e
        finally:
            if added:
                try:
                    sys.path.remove(cwd)
                except ValueError:
                    pass
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
