"""The project's tie policy: ``[tool.tiecheck]`` in pyproject.toml, read by ``tiecheck check``.

    [tool.tiecheck]
    fail-on = "warning"                      # error | warning | never (default: error)
    declared-agrees = true                   # declared and physical/stored layers must agree (TC015-TC018)
    ignore = ["TC006", "TC005:*.rotary_emb.*"]   # findings that never fail: a code, or a code:glob over names

    [[tool.tiecheck.targets]]
    target = "tests/models.py:build_gpt"     # anything `tiecheck inspect` takes
    expect = "tests/ties/gpt.json"           # a snapshot: exactly these tie groups and kinds
    tied = [["tok_emb.weight", "head.weight"]]          # these names must share memory
    not-tied = [["encoder.emb.weight", "decoder.emb.weight"]]   # these must not
    fail-on = "error"                        # this target only
    key = "model"                            # model state inside a training checkpoint
    trust-pickle = false
    trust-remote-code = false               # let a Hugging Face folder's own code build it
    declared-agrees = true                   # this target only
    ignore = ["TC010"]                       # added to the global list for this target

Paths (targets, `file.py:factory` specs, snapshots) are relative to the folder of the
pyproject.toml, so the check gives the same answer from any sub-folder. The file is found by
walking up from the current folder to the first pyproject.toml with a ``[tool.tiecheck]`` table,
stopping at the repository root (the folder holding ``.git``).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tiecheck.errors import TiecheckError
from tiecheck.report import FAIL_ON
from tiecheck.report.ignore import parse_ignore

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

TOP_KEYS = ("fail-on", "declared-agrees", "ignore", "targets")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
TARGET_KEYS = ("target", "expect", "tied", "not-tied", "fail-on", "key", "trust-pickle", "trust-remote-code",
               "declared-agrees", "ignore")


class PolicyError(TiecheckError):
    """pyproject.toml's [tool.tiecheck] cannot be read or understood."""


@dataclass(frozen=True)
class TargetPolicy:
    target: str  # as written (shown in output)
    resolved: str  # what the loaders get: paths made absolute against the pyproject's folder
    expect: Path | None = None
    tied: tuple[tuple[str, ...], ...] = ()
    not_tied: tuple[tuple[str, ...], ...] = ()
    fail_on: str = "error"
    key: str | None = None
    trust_pickle: bool = False
    trust_remote_code: bool = False
    source: Path | None = None  # the pyproject.toml that lists it
    # Declared and physical/stored layers must agree: TC015-TC018 fail whatever fail-on says.
    declared_agrees: bool = False
    # Findings to ignore (``tiecheck.report.ignore``): the global list, then this target's own.
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    path: Path | None = None  # the pyproject.toml; None when there is none
    fail_on: str = "error"
    targets: tuple[TargetPolicy, ...] = field(default_factory=tuple)
    declared_agrees: bool = False
    ignore: tuple[str, ...] = ()

    def find(self, target: str) -> TargetPolicy | None:
        """The policy entry for a target given on the command line: as written, or the same file or spec
        reached from the current folder."""
        here = canonical(resolve_target(target, Path.cwd()))
        for t in self.targets:
            if t.target == target or canonical(t.resolved) == here:
                return t
        return None

    def default_for(self, target: str) -> TargetPolicy:
        return TargetPolicy(target=target, resolved=target, fail_on=self.fail_on, declared_agrees=self.declared_agrees,
                            ignore=self.ignore)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{path}: invalid TOML: {e}") from e
    except OSError as e:
        raise PolicyError(f"{path}: cannot read ({e.strerror or e})") from e


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml with a [tool.tiecheck] table, from ``start`` up to the repository root."""
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and "tiecheck" in read_toml(candidate).get("tool", {}):
            return candidate
        if (folder / ".git").exists():
            return None
    return None


def load_policy(path: Path, *, required: bool = False) -> Policy:
    """The policy of one pyproject.toml; ``required`` makes a missing table an error."""
    table = read_toml(path).get("tool", {}).get("tiecheck")
    if table is None:
        if required:
            raise PolicyError(f"{path}: no [tool.tiecheck] table")
        return Policy(path=path)
    return parse_policy(table, path)


def _unknown(keys, allowed, where: str) -> None:
    for k in keys:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            raise PolicyError(f"{where}: unknown key '{k}'" + (f" (did you mean '{close[0]}'?)" if close else
                                                               f"; known keys: {', '.join(allowed)}"))


def _fail_on(value: Any, where: str) -> str:
    if value not in FAIL_ON:
        raise PolicyError(f"{where}: fail-on = {value!r}; choose one of: {', '.join(FAIL_ON)}")
    return value


def _ignore(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"{where}: ignore = {value!r}; expected a list such as [\"TC005\", \"TC005:*.rotary_emb.*\"]")
    for v in value:
        try:
            parse_ignore(v)
        except ValueError as e:
            raise PolicyError(f"{where}: ignore: {e}") from None
    return tuple(v.strip() for v in value)


def _groups(value: Any, where: str, minimum: int) -> tuple[tuple[str, ...], ...]:
    ok = isinstance(value, list) and all(
        isinstance(g, list) and len(g) >= minimum and all(isinstance(n, str) and n for n in g) for g in value)
    if not ok:
        need = "two or more" if minimum > 1 else "one or more"
        raise PolicyError(f"{where}: expected a list of lists of {need} tensor names, e.g. "
                          f"[[\"tok_emb.weight\", \"head.weight\"]]")
    return tuple(tuple(g) for g in value)


def resolve_target(target: str, root: Path) -> str:
    """A target as the loaders need it: relative files and `file.py:factory` specs made absolute.

    A missing file is resolved too (when it looks like a path), so its error names the right place.
    """
    if os.path.isabs(target):
        return target
    left, sep, attr = target.rpartition(":")
    if sep and left.endswith(".py"):
        return f"{root / left}:{attr}"
    if sep and _MODULE.fullmatch(left):
        return target  # package.module:factory, imported by name
    if (root / target).exists() or "/" in target or os.sep in target or Path(target).suffix:
        return str(root / target)
    return target  # a bundled model name


def canonical(resolved: str) -> str:
    """One spelling per file or spec (``a/../m.py:f`` and ``m.py:f`` are one target)."""
    left, sep, attr = resolved.rpartition(":")
    if sep and left.endswith(".py") and not os.path.exists(resolved):
        return f"{os.path.realpath(left)}:{attr}"
    return os.path.realpath(resolved) if os.path.exists(resolved) else resolved


def parse_policy(table: Any, path: Path) -> Policy:
    where = f"{path} [tool.tiecheck]"
    if not isinstance(table, dict):
        raise PolicyError(f"{where}: expected a table")
    _unknown(table, TOP_KEYS, where)
    fail_on = _fail_on(table.get("fail-on", "error"), where)
    declared_agrees = _flag(table, "declared-agrees", False, where)
    ignore = _ignore(table.get("ignore", []), where)
    entries = table.get("targets", [])
    if not isinstance(entries, list):
        raise PolicyError(f"{where}: 'targets' must be an array of tables: [[tool.tiecheck.targets]]")
    root = path.parent
    targets = []
    for i, t in enumerate(entries):
        here = f"{path} [[tool.tiecheck.targets]] #{i + 1}"
        if not isinstance(t, dict):
            raise PolicyError(f"{here}: expected a table with at least 'target'")
        _unknown(t, TARGET_KEYS, here)
        target = t.get("target")
        if not isinstance(target, str) or not target.strip():
            raise PolicyError(f"{here}: 'target' is required: a path, a bundled model name or a file.py:factory spec")
        here = f"{path} target '{target}'"
        expect = t.get("expect")
        if expect is not None and (not isinstance(expect, str) or not expect):
            raise PolicyError(f"{here}: 'expect' must be the path of a snapshot file")
        for key in ("key",):
            if key in t and not isinstance(t[key], str):
                raise PolicyError(f"{here}: '{key}' must be a string")
        for flag in ("trust-pickle", "trust-remote-code", "declared-agrees"):
            _flag(t, flag, False, here)
        targets.append(TargetPolicy(
            target=target,
            resolved=resolve_target(target, root),
            expect=(root / expect) if expect else None,
            tied=_groups(t.get("tied", []), f"{here}: tied", 2),
            not_tied=_groups(t.get("not-tied", []), f"{here}: not-tied", 1),
            fail_on=_fail_on(t.get("fail-on", fail_on), here),
            key=t.get("key"),
            trust_pickle=t.get("trust-pickle", False),
            trust_remote_code=t.get("trust-remote-code", False),
            source=path,
            declared_agrees=t.get("declared-agrees", declared_agrees),
            ignore=ignore + tuple(v for v in _ignore(t.get("ignore", []), here) if v not in ignore),
        ))
    return Policy(path=path, fail_on=fail_on, targets=tuple(targets), declared_agrees=declared_agrees, ignore=ignore)


def _flag(table: dict, key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise PolicyError(f"{where}: '{key}' must be true or false")
    return value


def with_overrides(t: TargetPolicy, **changes: Any) -> TargetPolicy:
    """A target's policy with command-line options applied (None leaves a setting as it is)."""
    return replace(t, **{k: v for k, v in changes.items() if v is not None})
