"""``tiecheck check``: fail a pipeline when a tie breaks.

Checks each target against its expectations (a snapshot file, groups that must or must not be
tied) and its findings (at ``fail-on`` or worse). Targets and expectations come from the command
line or from ``[tool.tiecheck]`` in pyproject.toml (see :mod:`tiecheck.check.policy`). Exit codes
as ``inspect``: 0 clean, 1 a check failed, 2 usage or input error (for any target).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tiecheck.cli.options import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    debug_option,
    expect_tied_option,
    handle_errors,
    ignore_option,
    key_option,
    trust_options,
    warn_trust,
)
from tiecheck.cli.progress import command_progress
from tiecheck.errors import TiecheckError
from tiecheck.report.text import clean, json_text, one_line

if TYPE_CHECKING:
    from tiecheck.check.outcome import Outcome


def render_text(outcomes: list[Outcome], update: bool) -> str:
    """The outcomes for a terminal: one line per target, its failing findings and warnings below it."""
    lines = []
    for o in clean(outcomes):
        if o.error:
            continue  # on stderr, as one line
        what = [f"{o.groups} tie group{'s' if o.groups != 1 else ''}"]
        if o.snapshot:
            verb = {"matched": "match", "differs": "differ from"}.get(o.snapshot_status or "")
            what.append(f"{'they ' + verb if verb else 'snapshot ' + str(o.snapshot_status)} {o.snapshot}")
            if o.snapshot_errors:
                what[-1] += f" (records error findings: {', '.join(o.snapshot_errors)})"
        lines.append(f"{o.target}: {'FAILED' if o.failing else 'ok'} ({'; '.join(what)})")
        for c in o.snapshot_changes:  # what the update changed, as a snapshot diff
            lines.append(f"  {o.snapshot}: {c.text()}")
        for f in o.failing:
            lines.append(f"  {f.severity:<8}{f.code} {f.message}")
            if f.hint:
                lines.append(f"  {'':<8}      hint: {f.hint}")
        for f in o.warnings:
            lines.append(f"  {'note':<8}{f.code} {f.message} (a warning; fails with --fail-on warning)")
    if len(outcomes) > 1 or update:
        lines.append(summary_line(outcomes, update))
    return "\n".join(lines) + "\n" if lines else ""


def summary_line(outcomes: list[Outcome], update: bool) -> str:
    n = len(outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    errors = sum(o.status == "error" for o in outcomes)
    parts = [f"{n} target{'s' if n != 1 else ''} checked"]
    if update:
        written = [o for o in outcomes if o.snapshot_status in ("created", "updated")]
        parts.append(f"{len(written)} snapshot{'s' if len(written) != 1 else ''} written")
    if failed:
        parts.append(f"{failed} failed")
    if errors:
        parts.append(f"{errors} could not be checked")
    return "tiecheck check: " + ", ".join(parts)


def _escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(s: str) -> str:
    return _escape_data(s).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, title: str, message: str, file: str | None = None) -> str:
    """One GitHub Actions workflow command: ``::error file=F,title=T::message``."""
    props = ([f"file={_escape_property(file)}"] if file else []) + [f"title={_escape_property(title)}"]
    return f"::{level} {','.join(props)}::{_escape_data(message)}"


def render_github(outcomes: list[Outcome], update: bool) -> str:
    """The outcomes as GitHub Actions annotations: text escaped as every format escapes it, then as
    workflow commands require (``%``, CR and LF encoded)."""
    lines = []
    for o in clean(outcomes):
        if o.error:
            lines.append(annotation("error", "tiecheck", o.error))
            continue
        for f in o.failing:
            hint = f"\nhint: {f.hint}" if f.hint else ""
            lines.append(annotation("error", f.code, f"{o.target}: {f.message}{hint}", o.origins.get(f.message)))
        for f in o.warnings:
            lines.append(annotation("warning", f.code, f"{o.target}: {f.message}\nhint: {f.hint}"))
        for c in o.snapshot_changes:
            lines.append(annotation("notice", "tiecheck snapshot", f"{o.target}: {o.snapshot} {c.text()}", o.snapshot))
    lines.append(summary_line(outcomes, update))
    return "\n".join(lines) + "\n"


@click.command("check")
@click.argument("targets", nargs=-1, metavar="[TARGET]...")
@click.option("--expect", "expect_file", metavar="FILE",
              help="Snapshot of the expected tie groups: written by --update or by `tiecheck inspect --format json`.")
@click.option("--update", is_flag=True, help="Write or refresh the snapshot files instead of comparing with them.")
@click.option("--accept-errors", is_flag=True,
              help="With --update: write a snapshot even of a target with error findings (e.g. a broken tie).")
@expect_tied_option
@click.option("--fail-on", type=click.Choice(["error", "warning", "never"]), default=None,
              help="Fail on findings of this severity or worse (default: the policy's, else error).")
@click.option("--format", "fmt", type=click.Choice(["text", "github", "json"]), default="text", show_default=True,
              help="`github` prints GitHub Actions annotations.")
@click.option("--config", "config_file", metavar="PYPROJECT",
              help="Read [tool.tiecheck] from this file (default: the nearest pyproject.toml that has it).")
@click.option("--no-config", is_flag=True, help="Ignore [tool.tiecheck].")
@click.option("--declared-agrees", is_flag=True, default=None,
              help="Fail when a declared tie disagrees with memory or the files (TC015-TC018), whatever --fail-on "
                   "says (policy: declared-agrees = true).")
@ignore_option
@key_option
@trust_options
@debug_option
@handle_errors
def check(targets, expect_file, update, accept_errors, expect_tied, fail_on, fmt, config_file, no_config,
          declared_agrees, ignore, key, trust_pickle, trust_remote_code, debug):
    """Check TARGETs' ties against expectations; exit 1 when one is broken.

    With no TARGET, checks every target listed in [tool.tiecheck] of pyproject.toml. Exit codes:
    0 clean, 1 a check failed, 2 usage or input error.
    """
    progress = command_progress(1)  # one phase per target, counted once the targets are known
    try:
        _check(progress, targets, expect_file, update, accept_errors, expect_tied, fail_on, fmt, config_file,
               no_config, declared_agrees, ignore, key, trust_pickle, trust_remote_code, debug)
    finally:
        progress.close()


def _check(progress, targets, expect_file, update, accept_errors, expect_tied, fail_on, fmt, config_file, no_config,
           declared_agrees, ignore, key, trust_pickle, trust_remote_code, debug):
    # The boundary where the work starts: checking analyses targets (torch, transformers).
    from tiecheck.check.outcome import check_target, shown  # noqa: PLC0415
    from tiecheck.check.policy import (  # noqa: PLC0415
        Policy,
        find_pyproject,
        load_policy,
        with_overrides,
    )

    if accept_errors and not update:
        raise TiecheckError("--accept-errors: only with --update (it lets an update record error findings)")
    if config_file and no_config:
        raise TiecheckError("--config and --no-config contradict each other; give one")
    if no_config:
        policy = Policy()
    elif config_file:
        policy = load_policy(Path(config_file), required=True)
    else:
        found = find_pyproject(Path.cwd())
        policy = load_policy(found) if found else Policy()

    if expect_file and len(targets) != 1:
        raise TiecheckError("--expect compares one target: give exactly one TARGET with it")
    if targets:
        plan = [policy.find(t) or policy.default_for(t) for t in targets]
    elif policy.targets:
        plan = list(policy.targets)
    else:
        where = f"{shown(policy.path)} has no [[tool.tiecheck.targets]]" if policy.path else \
            "no pyproject.toml with [tool.tiecheck] was found from this folder"
        raise TiecheckError(f"nothing to check: give a TARGET, or list targets in pyproject.toml ({where})")
    plan = [with_overrides(t, expect=Path(expect_file) if expect_file else None, fail_on=fail_on,
                           key=key, trust_pickle=trust_pickle or None, trust_remote_code=trust_remote_code or None,
                           declared_agrees=declared_agrees or None,
                           ignore=t.ignore + tuple(i for i in ignore if i not in t.ignore) if ignore else None)
            for t in plan]
    if update and not any(t.expect for t in plan):
        raise TiecheckError("--update writes the snapshot named by --expect FILE or by `expect` in "
                            "[tool.tiecheck]; none is set for " + ", ".join(t.target for t in plan))
    warn_trust(any(t.trust_pickle for t in plan), any(t.trust_remote_code for t in plan), prefix="")

    progress.total = len(plan)
    outcomes = []
    for t in plan:
        progress(0 if not outcomes else 1, f"checking {t.target}")
        outcomes.append(check_target(t, update=update, extra_tied=expect_tied, debug=debug, accept_errors=accept_errors,
                                     fail_on_origin=shown(policy.path) if policy.path and not fail_on else None))
    progress.close()  # before the report is written
    if fmt == "json":
        text = json_text({"targets": [o.to_dict() for o in outcomes]})
    elif fmt == "github":
        text = render_github(outcomes, update)
    else:
        text = render_text(outcomes, update)
    click.echo(text, nl=False)
    for o in outcomes:
        if o.error and fmt != "github":  # github already carries it as an annotation
            click.echo(f"tiecheck: error: {one_line(o.error)}", err=True)
    statuses = {o.status for o in outcomes}
    sys.exit(EXIT_ERROR if "error" in statuses else EXIT_FAILED if "failed" in statuses else EXIT_OK)
