"""``tiecheck.fix()`` and the ``tiecheck fix`` command: write a corrected copy of a checkpoint -- ties restored, copies dropped,
declarations made true -- and verify it before saying done.

layouts.py says which layout a target is, actions.py decides (a Plan of Actions answering what
``inspect`` found), write.py writes (one writer per layout, never in place, a temporary name renamed
at the end), verify.py proves the copy, fix_text.py says it all for people. The target is read once
(a torch.save file as torch.load makes it, kept for its writer) and analysed once: the plan reads the
same Analysis the report came from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiecheck.api import examine
from tiecheck.errors import TiecheckError
from tiecheck.loaders import load_path
from tiecheck.repair.actions import OPTIMIZER_KEYS, Action, Plan, make_plan, parse_tie, parse_untie
from tiecheck.repair.layouts import layout_of
from tiecheck.repair.verify import Check, verify
from tiecheck.repair.write import check_output, clear_stale, discard, publish, temp_path, write


@dataclass
class FixResult:
    """The plan, where the copy went, and the checks of the copy."""

    plan: Plan
    output: str | None
    dry_run: bool
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # stale temporary outputs removed or left

    @property
    def verified(self) -> bool:
        """The copy was written and every check holds."""
        return not self.dry_run and all(c.ok for c in self.checks)

    def exit_code(self) -> int:
        """0 when verified (or a dry run), 1 when a check failed."""
        return 0 if self.dry_run or self.verified else 1

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "output": self.output, "dry_run": self.dry_run,
                "verified": self.verified, "checks": [c.to_dict() for c in self.checks], "notes": self.notes}


def _pairs(values: Iterable[Any], parse) -> list[tuple[str, str]]:
    return [tuple(v) if isinstance(v, (tuple, list)) else parse(v) for v in values]


def _optimizer_keys(obj: Any) -> list[str]:
    return [k for k in OPTIMIZER_KEYS if isinstance(obj, dict) and obj.get(k) not in (None, {}, [])]


def fix(target: str | os.PathLike, output: str | os.PathLike | None = None, *, dry_run: bool = False,
        tie: Sequence[Any] = (), untie: Sequence[Any] = (), force: bool = False,
        drop_optimizer: bool = False, progress: Callable[[int, str], None] | None = None) -> FixResult:
    """Plan, write and verify a corrected copy of ``target`` at ``output``.

    Args:
        target: a safetensors file, a ``*.safetensors.index.json``, a torch.save (zip) file, or a
            Hugging Face folder of safetensors weights.
        output: where the copy goes (a file for a file, a folder for a folder or an index); never the
            input or inside it. Not needed with ``dry_run``.
        dry_run: plan only; nothing is written.
        tie: ``"A=B"`` strings or (A, B) pairs: A becomes B (B's bytes are kept; the plan says what is lost).
        untie: ``"A,B"`` strings or pairs: give each name its own copy.
        force: replace an existing output that fix wrote (never the input, nor anything else).
        drop_optimizer: drop a training checkpoint's optimizer state when parameters merge or split.
        progress: called as ``progress(units_done, label)`` as each phase starts: reading, analysing,
            planning, writing, verifying (the last two not on a dry run).

    Returns:
        The FixResult: the plan, and the checks of the written copy (none on a dry run).

    Raises:
        TiecheckError: bad input, an output that would touch the input, or a request the format cannot express.
    """

    path = Path(target)
    if not path.exists():
        raise TiecheckError(f"{path}: no such file or folder")
    out = None if output is None else Path(output)
    if out is None and not dry_run:
        raise TiecheckError("give the corrected copy a path with -o OUTPUT (or plan only with --dry-run)")
    if out is not None and not dry_run:  # a dry run writes nothing, so any -o is fine
        check_output(path, out, force=force)
    ties, unties = _pairs(tie, parse_tie), _pairs(untie, parse_untie)

    step = progress or (lambda n, label: None)
    step(0, f"reading {path}")
    subject = load_path(path, whole=True)
    layout, weights = layout_of(path)  # the writer's; a target no writer takes is refused here
    step(1, f"analysing {len(subject.tensors):,} tensors")
    # The content pass too: a broken tie (TC005) is found by comparing bytes, and fix answers it.
    analysis = examine(subject, duplicates=True)
    step(1, "planning")
    torch_obj = subject.checkpoint
    plan = make_plan(analysis, path, layout, tie=ties, untie=unties, drop_optimizer=drop_optimizer,
                     optimizer_keys=_optimizer_keys(torch_obj), output=out)
    result = FixResult(plan=plan, output=None if out is None else str(out), dry_run=dry_run)
    if dry_run:
        return result
    result.notes = clear_stale(out)
    tmp = temp_path(out)
    discard(tmp)
    try:
        step(1, f"writing {out}")
        write(plan, path, weights, tmp, torch_obj=torch_obj, state_key=subject.source.key)
        step(1, "verifying the copy")
        result.checks = verify(plan, path, tmp, subject)
        if result.verified:
            publish(tmp, out, path, force=force)
    finally:
        discard(tmp)  # published: renamed away; refused or failed: never left beside the output
    if not result.verified:
        result.output = None
    return result


__all__ = ["Action", "Check", "FixResult", "Plan", "fix"]
