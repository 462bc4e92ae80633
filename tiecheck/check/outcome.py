"""The logic of ``tiecheck check``: hold each target to its expectations, and say what failed.

Checks each target against its expectations (a snapshot file, groups that must or must not be
tied) and its findings (at ``fail-on`` or worse). Targets and expectations come from the command
line or from ``[tool.tiecheck]`` in pyproject.toml (see ``tiecheck.check.policy``). Exit codes as
``inspect``: 0 clean, 1 a check failed, 2 usage or input error (for any target).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiecheck.analyses.expect import (
    not_tied_findings,
    snapshot_findings,
    tied_findings,
)
from tiecheck.api import analyze
from tiecheck.check import snapshot as snap
from tiecheck.check.policy import TargetPolicy
from tiecheck.errors import TiecheckError
from tiecheck.findings import Finding

# The findings of a declared tie that memory or the files contradict (docs/layers.md).
DECLARED_DISAGREE = frozenset({"TC015", "TC016", "TC017", "TC018"})


@dataclass
class Outcome:
    """What checking one target gave."""

    target: str
    failing: list[Finding] = field(default_factory=list)  # findings that fail the check
    warnings: list[Finding] = field(default_factory=list)  # warnings below fail-on: shown, not failing
    error: str | None = None  # the target or its expectation could not be read
    snapshot: str | None = None  # the snapshot file compared or written
    snapshot_status: str | None = None  # matched | created | updated | unchanged
    snapshot_errors: list[str] = field(default_factory=list)  # codes of error findings a written snapshot records
    snapshot_changes: list[snap.Change] = field(default_factory=list)  # what an update changed in the file
    groups: int = 0
    origins: dict[str, str] = field(default_factory=dict)  # finding message -> file it came from

    @property
    def status(self) -> str:
        return "error" if self.error else "failed" if self.failing else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "status": self.status, "error": self.error, "tie_groups": self.groups,
                "snapshot": self.snapshot, "snapshot_status": self.snapshot_status,
                "snapshot_changes": [c.to_dict() for c in self.snapshot_changes],
                "failing": [f.to_dict() for f in self.failing], "warnings": [f.to_dict() for f in self.warnings]}


def shown(path: Path | str) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def check_target(t: TargetPolicy, *, update: bool, extra_tied=(), debug: bool = False,
                 accept_errors: bool = False, fail_on_origin: str | None = None) -> Outcome:
    """Analyse one target and hold it to its policy and to the ``extra_tied`` groups of the command line.

    Args:
        t: the target with its expectations, from ``[tool.tiecheck]`` or the command line.
        update: write or refresh the target's snapshot instead of comparing with it.
        extra_tied: name groups that must share memory, on top of the policy's.
        debug: let an unexpected exception propagate (for its traceback) instead of
            recording it as this target's error.
        accept_errors: let ``update`` write a snapshot of a target with error findings (a
            broken tie); without it such an update is this target's error.
        fail_on_origin: the file that set ``t.fail_on`` (the policy's pyproject.toml), for the
            findings that fail only because of it; None when the command line set it.

    Returns:
        The :class:`Outcome`: failing findings, warnings below ``fail-on``, or the error that
        stopped this target (the other targets still run).
    """
    out = Outcome(target=t.target)
    try:
        report = analyze(t.resolved, key=t.key, trust_pickle=t.trust_pickle, trust_remote_code=t.trust_remote_code,
                         ignore=t.ignore)
        state = report.tie_state()
        out.groups = len(report.tie_groups)
        missing = sorted({n for g in t.not_tied for n in g if n not in state.names})
        if missing:
            raise TiecheckError(f"{t.target}: not-tied: {'; '.join(state.describe(n) for n in missing)}; "
                                f"fix the names in the policy")
        from_policy = tied_findings(state, t.tied) + not_tied_findings(state, t.not_tied)
        if t.source is not None:  # annotations point at the file that states the rule
            out.origins.update((f.message, shown(t.source)) for f in from_policy)
        expected = from_policy + tied_findings(state, extra_tied)
        if t.expect is not None:
            out.snapshot = shown(t.expect)
            if not update and not t.expect.exists():
                raise TiecheckError(f"no snapshot {out.snapshot} yet: rerun the same command with --update "
                                    f"to write it, then commit it")
            if update:
                errors = [f for f in report.findings if f.severity == "error" and not f.ignored]
                if errors and not accept_errors:
                    what = "; ".join(f"{f.code} {', '.join(f.names)}" for f in errors)
                    n = len(errors)
                    raise TiecheckError(f"not writing the snapshot {out.snapshot}: {t.target} has {n} error "
                                        f"finding{'s' if n > 1 else ''} ({what}); fix it, or record this state "
                                        f"anyway with --update --accept-errors")
                out.snapshot_errors = sorted({f.code for f in errors})
                out.snapshot_status, out.snapshot_changes = snap.update(
                    t.expect, snap.Snapshot.from_report(report), protect=(t.resolved,))
            else:
                found = snapshot_findings(state, snap.read(t.expect).groups, origin=out.snapshot)
                expected += found
                for f in found:
                    out.origins[f.message] = out.snapshot
                out.snapshot_status = "differs" if found else "matched"
    except TiecheckError as e:
        out.error = str(e) if str(e).startswith(t.target) else f"{t.target}: {e}"
        return out
    except Exception as e:  # a bug or an unforeseen input: this target fails, the others still run
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        out.error = f"{t.target}: unexpected {type(e).__name__}: {first} (rerun with --debug for the traceback)"
        return out
    failing = report.failing_findings(t.fail_on)
    if fail_on_origin is not None:
        for f in failing:
            if f.severity != "error":  # fails only because the policy's fail-on says so
                out.origins.setdefault(f.message, fail_on_origin)
    if t.declared_agrees:
        # Declared against physical and stored: these fail whatever their severity.
        disagree = [f for f in report.findings if f.code in DECLARED_DISAGREE and f not in failing and not f.ignored]
        if t.source is not None:
            out.origins.update((f.message, shown(t.source)) for f in disagree)
        failing = failing + disagree
    out.failing = expected + failing
    out.warnings = [f for f in report.findings if f.severity == "warning" and f not in failing and not f.ignored]
    return out
