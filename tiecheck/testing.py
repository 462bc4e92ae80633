"""Assertions about weight ties, for any test suite (pytest is not needed).

    from tiecheck.testing import assert_tied, assert_no_broken_ties

    model.load_state_dict(state, assign=True)
    assert_tied(model, "tok_emb.weight", "head.weight")    # fails: assign=True untied them
    assert_no_broken_ties(model)

Each assertion takes an ``nn.Module``, a state dict, anything ``tiecheck.analyze`` accepts (a
path, a bundled model name, a ``file.py:factory`` spec) or a ``Report`` already made, and raises
a subclass of ``AssertionError`` whose message says what was expected, what each name shares
memory with now, and a hint tied to the likely cause. The error keeps the findings in
``.findings`` for code that wants to look closer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiecheck.analyses.expect import (
    TieState,
    group_lines,
    not_tied_findings,
    snapshot_findings,
    tied_findings,
    untied_hint,
)
from tiecheck.api import analyze
from tiecheck.check import snapshot as snap
from tiecheck.errors import TiecheckError
from tiecheck.findings import SEVERITY_RANK, Finding, finding
from tiecheck.materialize import MODES, check_materialization, describe
from tiecheck.report import Report

if TYPE_CHECKING:  # pragma: no cover
    from tiecheck.report import Report

__all__ = [
    "BrokenTieError",
    "FindingsError",
    "NotTiedError",
    "SnapshotMismatchError",
    "SnapshotMissingError",
    "TieAssertionError",
    "TieLostError",
    "UnexpectedTieError",
    "UnknownNameError",
    "assert_no_broken_ties",
    "assert_no_findings",
    "assert_not_tied",
    "assert_tied",
    "assert_ties_match_snapshot",
    "assert_ties_survive",
]


class TieAssertionError(AssertionError):
    """A tie assertion failed. ``findings`` holds the findings (``Finding``) behind the message."""

    def __init__(self, message: str, findings: Iterable[Finding] = ()):
        super().__init__(message)
        self.findings = list(findings)


class NotTiedError(TieAssertionError):
    """Names expected to share memory do not (or share it through distinct Parameters)."""


class UnexpectedTieError(TieAssertionError):
    """Names expected to stay apart share memory."""


class UnknownNameError(TieAssertionError):
    """An assertion names a tensor the target does not have: it could never pass or fail honestly."""


class BrokenTieError(TieAssertionError):
    """Untied duplicates, or ties made of distinct Parameters: ties that broke."""


class FindingsError(TieAssertionError):
    """Findings at or above the severity the assertion allows."""


class SnapshotMismatchError(TieAssertionError):
    """The tie groups differ from the stored snapshot."""


class SnapshotMissingError(TieAssertionError):
    """There is no snapshot to compare with yet."""


class SnapshotErrorsError(TieAssertionError):
    """An update would record a state that has error findings (a broken tie, distinct Parameters)."""


class TieLostError(TieAssertionError):
    """A tie of the model built on meta did not survive materialisation (``lost`` lists them)."""


# Findings that mean a tie broke or was made wrong.
BROKEN_TIE_CODES = ("TC002", "TC005", "TC010")


def report_of(model: Any, *, duplicates: bool = True) -> Report:
    """The Report of whatever an assertion was given (a Report is used as it is)."""

    if isinstance(model, Report):
        return model

    return analyze(model, duplicates=duplicates)


def _explained(model: Any, report: Report) -> Report:
    """The report with the content pass, so a failure can say whether values are still equal.

    Tie checks skip that pass while they succeed (it reads every weight); a failure is rare and
    worth the read.
    """
    content = report.content
    if content is None or content.ran or not (content.reason or "").startswith("skipped"):
        return report  # it ran, or cannot run (no tensor data on the meta device)
    return report_of(model, duplicates=True)


def _target(report: Report) -> str:
    return report.source.target


def _finding_lines(findings: Iterable[Finding], indent: str = "  ") -> list[str]:
    lines = []
    for f in findings:
        lines.append(f"{indent}[{f.code}] {f.severity}: {f.message}")
        if f.hint:
            lines.append(f"{indent}  hint: {f.hint}")
    return lines


def _check_names(state: TieState, names: tuple[str, ...], what: str, report: Report) -> None:
    __tracebackhide__ = True
    missing = [n for n in names if n not in state.names]
    if missing:
        lines = [f"{what}: {len(missing)} name{'s' if len(missing) > 1 else ''} not in {_target(report)}"]
        lines += [f"  {state.describe(n)}" for n in missing]
        lines.append("  hint: list the names with `tiecheck inspect TARGET --format json` (a module lists every "
                     "name a Parameter is reachable by)")
        raise UnknownNameError("\n".join(lines))


def _names_arg(fn: str, names: tuple[str, ...]) -> tuple[str, ...]:
    if not names:
        raise TypeError(f"{fn}() needs at least one tensor name after the model")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{fn}() takes tensor names as separate strings, got {type(bad[0]).__name__}")
    return tuple(dict.fromkeys(names))


def assert_tied(model: Any, *names: str) -> None:
    """The names share one memory through one Parameter (a true tie).

    Ties made of distinct Parameter objects over one memory fail too: their gradients are not
    shared.

    Args:
        model: anything :func:`tiecheck.analyze` accepts: an ``nn.Module``, a state dict, a path, a
            bundled model name or a ``file.py:factory`` spec.
        *names: two or more names that must be one tensor; with one name, that name must be
            tied to at least one other.

    Raises:
        NotTiedError: (a ``TieAssertionError``) with what each name is now and the line that
            re-ties them; a name the model does not have is reported with the closest names.
    """
    __tracebackhide__ = True
    names = _names_arg("assert_tied", names)
    report = report_of(model, duplicates=False)
    state = report.tie_state()
    _check_names(state, names, f"assert_tied({', '.join(names)})", report)
    if not _tied_failures(state, report, names):
        return
    report = _explained(model, report)
    state = report.tie_state()
    failures = _tied_failures(state, report, names)
    if len(names) == 1:
        head = f"expected {names[0]} to be tied to another name in {_target(report)}, but it is not"
    else:
        head = f"expected {', '.join(names)} to be tied in {_target(report)}, but they are not"
    lines = [head, "  now:"] + [f"    {state.describe(n)}" for n in names]
    for f in failures:
        # A TC009 message repeats the lines above; other findings (TC002) add what they found.
        lines += ([] if f.code == "TC009" else [f"  [{f.code}] {f.message}"]) + [f"  hint: {f.hint}"]
    raise NotTiedError("\n".join(lines), failures)


def _tied_failures(state: TieState, report: Report, names: tuple[str, ...]) -> list[Finding]:
    if len(names) == 1:
        if state.group_of(names[0]) is not None:
            failures = []
        else:
            copies = state.copies_of(names[0])
            failures = [finding("TC009", f"{names[0]} shares memory with nothing", names,
                                hint=untied_hint(state, names + tuple(copies[:1])) if copies else
                                "tie it where the model is built (`head.weight = emb.weight`), or re-tie after "
                                "load_state_dict(assign=True): model.tie_weights()")]
    else:
        failures = tied_findings(state, [names])
    # One memory through distinct Parameters is not a tie for training: TC002 from the analysis.
    failures += [f for f in report.findings_of("TC002") if set(f.names) & set(names)]
    return failures


def assert_not_tied(model: Any, *names: str) -> None:
    """No two of the names share memory. With one name: it shares memory with nothing.

    Args:
        model: anything :func:`tiecheck.analyze` accepts: an ``nn.Module``, a state dict, a path, a
            bundled model name or a ``file.py:factory`` spec.
        *names: the names that must stay apart.

    Raises:
        TieAssertionError: naming the pairs that share memory.
    """
    __tracebackhide__ = True
    names = _names_arg("assert_not_tied", names)
    report = report_of(model, duplicates=False)
    state = report.tie_state()
    _check_names(state, names, f"assert_not_tied({', '.join(names)})", report)
    failures = not_tied_findings(state, [names])
    if not failures:
        return
    what = names[0] if len(names) == 1 else ", ".join(names)
    lines = [f"expected {what} not to be tied in {_target(report)}, but "
             f"{'it shares memory' if len(names) == 1 else 'they share memory'}", "  now:"]
    lines += [f"    {state.describe(n)}" for n in names]
    lines += [f"  hint: {failures[0].hint}"]
    raise UnexpectedTieError("\n".join(lines), failures)


def assert_no_broken_ties(model: Any) -> None:
    """No broken tie: no untied duplicates, no tie made of distinct Parameters, no stored tie with
    two different values.

    Untied duplicates are equal values in separate memory; constant-valued groups such as fresh
    LayerNorm weights, buffers and copies nothing ties or relates (TC005 at info) are ignored. The check reads tensor values, so the model needs its weights.

    Args:
        model: anything :func:`tiecheck.analyze` accepts: an ``nn.Module``, a state dict, a path, a
            bundled model name or a ``file.py:factory`` spec.

    Raises:
        TieAssertionError: listing each broken tie with its hint.
        TiecheckError: the model has no values to compare (it is on the meta device).
    """
    __tracebackhide__ = True

    report = report_of(model, duplicates=True)
    if report.content is None or not report.content.ran:
        reason = (report.content and report.content.reason) or "the content pass did not run"
        raise TiecheckError(f"{_target(report)}: cannot look for broken ties: {reason}; pass a model with its "
                            f"weights (not on the meta device) or a report made with duplicates=True")
    state = report.tie_state()
    # An info TC005 is equal values nothing ties (a deterministic initialisation): no broken tie.
    broken = [f for f in report.findings_of(*BROKEN_TIE_CODES) if f.severity != "info"]
    if not broken:
        return
    lines = [f"{len(broken)} broken tie{'s' if len(broken) > 1 else ''} in {_target(report)}:"]
    for f in broken:
        lines += _finding_lines([replace(f, hint=untied_hint(state, f.names)) if f.code == "TC005" else f])
    raise BrokenTieError("\n".join(lines), broken)


def assert_no_findings(model: Any, severity: str = "warning", *, ignore: Iterable[str] = ()) -> None:
    """No finding at ``severity`` or worse.

    Args:
        model: anything :func:`tiecheck.analyze` accepts: an ``nn.Module``, a state dict, a path, a
            bundled model name or a ``file.py:factory`` spec.
        severity: ``"error"``, ``"warning"`` or ``"info"``: the least severe finding that fails.
        ignore: finding codes to leave out, e.g. ``("TC006",)`` for tie candidates.

    Raises:
        TieAssertionError: listing each finding with its hint.
    """
    __tracebackhide__ = True
    if severity not in SEVERITY_RANK:
        raise ValueError(f"severity must be one of {', '.join(SEVERITY_RANK)}, not {severity!r}")
    ignored = set(ignore)
    report = report_of(model, duplicates=True)
    found = [f for f in report.findings if SEVERITY_RANK[f.severity] >= SEVERITY_RANK[severity] and f.code not in ignored]
    if not found:
        return
    lines = [f"{len(found)} finding{'s' if len(found) > 1 else ''} at {severity} or worse in {_target(report)}:"]
    lines += _finding_lines(found)
    raise FindingsError("\n".join(lines), found)


def error_findings(report: Report) -> list[Finding]:
    """The report's findings of severity error: the state a snapshot must not record unawares."""
    return [f for f in report.findings if f.severity == "error"]


def refuse_error_state(model: Any, label: str, how_to_accept: str) -> list[Finding]:
    """Raise SnapshotErrorsError when the target has error findings; return them otherwise (none).

    A snapshot records what the ties are, not whether they are right: writing one over a broken
    tie would make every later run pass with the tie broken.

    Args:
        model: what the snapshot describes (anything ``tiecheck.analyze`` accepts, or a Report).
        label: the snapshot's path as messages show it.
        how_to_accept: how to record the state anyway, in the caller's own terms.

    Returns:
        An empty list (the state has no error findings).
    """
    __tracebackhide__ = True
    report = report_of(model)
    errors = error_findings(report)
    if errors:
        n = len(errors)
        lines = [f"not writing the snapshot {label}: {_target(report)} has {n} error finding{'s' if n > 1 else ''}:"]
        lines += _finding_lines(errors)
        lines.append(f"  fix the model, or record this state anyway: {how_to_accept}")
        raise SnapshotErrorsError("\n".join(lines), errors)
    return errors


def match_snapshot(model: Any, path: str | os.PathLike, *, update: bool = False, label: str | None = None,
                   how_to_create: str | None = None, how_to_update: str | None = None,
                   accept_errors: bool = False, how_to_accept: str | None = None,
                   on_changes: Callable[[list], None] | None = None) -> str:
    """Compare the target's tie groups with the snapshot at ``path``, or write it when ``update``.

    Args:
        model: anything :func:`tiecheck.analyze` accepts: an ``nn.Module``, a state dict, a path, a
            bundled model name or a ``file.py:factory`` spec.
        path: the snapshot JSON file (``tiecheck inspect --format json`` output is accepted too).
        update: write or refresh the file instead of comparing.
        label: the path as messages show it (default: ``path``).
        how_to_create, how_to_update: the sentences that end the messages, so each front end (the
            pytest plugin, ``tiecheck check``) says how to fix it in its own terms.
        accept_errors: let an update record a state with error findings (a broken tie); without
            it such an update is refused.
        on_changes: called with what an update changed in the file (each tie group it removes,
            adds or changes, as :func:`tiecheck.check.snapshot.update` lists them).

    Returns:
        ``"created"``, ``"updated"`` or ``"unchanged"`` in update mode; ``"matched"`` otherwise.

    Raises:
        SnapshotMissingError: no snapshot yet and ``update`` is false.
        SnapshotMismatchError: the tie groups differ, with a line per difference.
        SnapshotErrorsError: an update of a state with error findings, without ``accept_errors``.
    """
    __tracebackhide__ = True

    path = Path(path)
    label = label or str(path)
    if update and not accept_errors:
        refuse_error_state(model, label, how_to_accept or f"assert_ties_match_snapshot(model, {str(path)!r}, "
                                                          f"update=True, accept_errors=True)")
    report = report_of(model, duplicates=False)
    if update:
        protect = (os.fspath(model),) if isinstance(model, (str, os.PathLike)) else ()
        status, found = snap.update(path, snap.Snapshot.from_report(report), protect)
        if on_changes is not None and found:
            on_changes(found)
        return status
    if not path.exists():
        how = how_to_create or (f"create it with assert_ties_match_snapshot(model, {str(path)!r}, update=True) "
                                f"or `tiecheck check TARGET --expect {label} --update`")
        raise SnapshotMissingError(f"no tie snapshot at {label}: {how}")
    expected = snap.read(path)
    state = report.tie_state()
    findings = snapshot_findings(state, expected.groups, origin=label)
    if not findings:
        return "matched"
    report = _explained(model, report)
    state = report.tie_state()
    findings = snapshot_findings(state, expected.groups, origin=label)
    lines = [f"tie groups of {_target(report)} differ from the snapshot {label}",
             "  expected:"] + [f"    {g}" for g in group_lines((g.names, g.kind) for g in expected.groups)]
    lines += ["  actual:"] + [f"    {g}" for g in group_lines(state.groups)]
    lines += ["  differences:", *_finding_lines(findings, indent="    ")]
    how = how_to_update or (f"if the change is intended, rewrite the snapshot: assert_ties_match_snapshot(model, "
                            f"{str(path)!r}, update=True) or `tiecheck check TARGET --expect {label} --update`")
    lines.append(f"  {how}")
    raise SnapshotMismatchError("\n".join(lines), [f.to_dict() for f in findings])


def assert_ties_match_snapshot(model: Any, snapshot: str | os.PathLike, *, update: bool = False,
                               accept_errors: bool = False) -> None:
    """The tie groups (names and kinds) equal those stored in the JSON file ``snapshot``.

    Kinds ``same_parameter`` (a live module) and ``shared_storage`` (a file) match each other:
    both are one memory.

    Args:
        model: anything :func:`tiecheck.analyze` accepts: an ``nn.Module``, a state dict, a path, a
            bundled model name or a ``file.py:factory`` spec.
        snapshot: the JSON file holding the expected tie groups.
        update: write or refresh the file instead of comparing.
        accept_errors: let the update record a state with error findings (a broken tie).

    Raises:
        SnapshotMissingError, SnapshotMismatchError, SnapshotErrorsError: as :func:`match_snapshot`.
    """
    __tracebackhide__ = True
    match_snapshot(model, snapshot, update=update, accept_errors=accept_errors)


def assert_ties_survive(build: Any, *, materialize: Iterable[str] = MODES, device: Any = "cpu", init: Any = None,
                        after: Any = None, state_dict: Any = None, move_to: Any = None) -> None:
    """Build on meta, materialise as training code does, and fail when a tie came out as two Parameters.

    The ways (``materialize``): ``to_empty`` (``model.to_empty(device=...)`` then ``init``),
    ``assign`` (``model.load_state_dict(state, assign=True)``), ``move`` (a model built on
    ``device`` sent to ``move_to``, default ``"meta"``: a move that cannot swap tensors in place,
    as on XLA). Each replaces shared Parameters module by module unless the model re-ties.

    Args:
        build: makes the model with no arguments (called under ``torch.device("meta")``).
        materialize: which ways to run.
        device: where the model is made real.
        init: initialises the model after ``to_empty`` (default: each module's ``reset_parameters``).
        after: your step after materialising (e.g. ``lambda m: m.tie_weights()``), run before the check.
        state_dict: what ``assign`` loads (default: the state dict of a model built on ``device``).
        move_to: where ``move`` sends the model.

    Raises:
        TieLostError: names the tie groups lost per way and the lines that re-tie them
            (``.lost`` holds them).
    """
    __tracebackhide__ = True
    groups, lost = check_materialization(build, materialize=materialize, device=device, init=init, after=after,
                                         state_dict=state_dict, move_to=move_to)
    if lost:
        err = TieLostError(describe(lost, groups))
        err.lost = lost
        raise err
