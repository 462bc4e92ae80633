"""``tiecheck diff`` and ``tiecheck.diff()``: the tie structure of two targets compared.

Before and after fine-tuning, a format conversion or quantization, the question is whether
every tie survived. Each side is analysed like ``inspect`` does (or taken from a Report, or a
report saved as JSON), then tie groups are matched by name:

* kept: the same names tied on both sides (``grown`` when B ties more names to them);
* lost: names tied in A that B does not tie together; each name's state in B is said
  (tied elsewhere, an untied duplicate with equal content, untied with other content, absent);
* added: ties in B among names A did not tie;
* layout changes: a kept tie whose shape or dtype differs (a resized vocabulary, a bf16 cast);
* kind changes: a kept tie whose kind differs in substance -- one Parameter in A, distinct
  Parameters over the same memory in B (gradients no longer shared), or a plain alias turned
  into a transposed one. (A module's ``same_parameter`` and a file's ``shared_storage`` are the
  same tie seen two ways, not a change.)

A tie of A missing in B, or degraded in kind, is the failure: exit code 1, like ``inspect
--expect-tied``.

Across formats whose names differ by design (a PyTorch checkpoint against its ONNX or GGUF
export), ties are matched by content instead: every tensor of A is looked for in B by its
values -- the same bytes, the transpose, or either after a lossless dtype conversion -- and by
shape and position when no content matches; each row says how it was matched. A tie of A is
then one tensor in B (kept), several tensors in B (became copies, and what they cost), or
nowhere (lost); what B stores that matches nothing of A is listed too.

The package is named after its job, not its command: ``tiecheck.diff`` is the public function, and
a subpackage of that name would replace it as an attribute of ``tiecheck`` once imported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiecheck.api import analyze, analyze_subject, collector
from tiecheck.compare.by_content import compare_content
from tiecheck.compare.by_name import compare
from tiecheck.compare.diff_text import render_diff
from tiecheck.compare.tie_diff import TieDiff
from tiecheck.errors import TargetError
from tiecheck.loaders import load_target
from tiecheck.loaders.subject import Subject
from tiecheck.report.report import Report

__all__ = ["TieDiff", "compare", "compare_content", "diff", "render_diff"]


def _as_report(target: Any, **kwargs) -> Report:
    if isinstance(target, Report):
        return target
    if isinstance(target, dict) and "tie_groups" in target and "schema_version" in target:
        return Report.from_dict(target)
    saved = _saved_report(target)
    if saved is not None:
        return saved
    return analyze(target, **kwargs)


def _saved_report(target: Any) -> Report | None:
    """A report written by ``inspect --format json``, recognised by content."""
    if not isinstance(target, (str, Path)):
        return None
    p = Path(target)
    try:
        if not p.is_file() or p.stat().st_size > (64 << 20):
            return None
        with open(p, "rb") as fh:
            if fh.read(64).lstrip()[:1] != b"{":
                return None
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or "tie_groups" not in obj or "schema_version" not in obj:
        return None
    try:
        report = Report.from_dict(obj)
    except (ValueError, KeyError) as e:
        raise TargetError(f"{p}: a tiecheck report that cannot be read ({e})") from e
    # The header names what was compared: the saved report, and what it was made from.
    source = dataclasses.replace(report.source, target=str(p), format=f"saved report of {report.source.target}")
    return dataclasses.replace(report, source=source)


def diff(a: Any, b: Any, *, key: str | None = None, trust_pickle: bool = False, trust_remote_code: bool = False,
         duplicates: bool = True, progress: Callable[[int, str], None] | None = None) -> TieDiff:
    """Compare the ties of two targets (anything ``analyze`` accepts, a Report, or a saved JSON report).

    The content pass runs by default so that a tie broken into equal copies is recognised as
    such; ``duplicates=False`` skips it. ``progress(units_done, label)`` is called as each of
    four phases starts (reading A, reading B, analysing A, analysing B), as ``analyze`` calls it.
    """
    with collector(enabled=False):  # as in analyze: two checkpoints of 100,000 tensors each
        return _diff(a, b, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                     duplicates=duplicates, step=progress or (lambda n, label: None))


def _diff(a: Any, b: Any, *, key: str | None, trust_pickle: bool, trust_remote_code: bool,
          duplicates: bool, step: Callable[[int, str], None]) -> TieDiff:
    kwargs = dict(key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code, duplicates=duplicates)
    step(0, f"reading {_label(a)}")
    sa = _as_subject(a, **kwargs)
    step(1, f"reading {_label(b)}")
    sb = _as_subject(b, **kwargs)

    def report(target: Any, subject: Subject | None, units: int) -> Report:
        step(units, f"analysing {_label(target)}")
        return _as_report(target, **kwargs) if subject is None else analyze_subject(subject, duplicates=duplicates)

    ra, rb = report(a, sa, 1), report(b, sb, 1)
    step(1, "comparing")
    if sa is not None and sb is not None and renames_tensors(sa, sb):
        return compare_content(ra, rb, sa, sb)
    return compare(ra, rb)


def _label(target: Any) -> str:
    """A target as a progress label: its path or name, else what it is."""
    return str(target) if isinstance(target, (str, Path)) else type(target).__name__


# Formats whose tensor names differ from the PyTorch model's by design.
RENAMING_FORMATS = ("ONNX", "GGUF")


def _as_subject(target: Any, *, key=None, trust_pickle=False, trust_remote_code=False, duplicates=True
                ) -> Subject | None:
    """The loaded target, or None for a Report or a saved report (which hold no tensors)."""
    if isinstance(target, (Report, dict)) or _saved_report(target) is not None:
        return None
    return load_target(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code)


def renames_tensors(sa: Subject, sb: Subject) -> bool:
    """Match by content when one side is an export that renames tensors and the formats differ."""
    fa, fb = sa.source.format, sb.source.format
    return fa != fb and (fa in RENAMING_FORMATS or fb in RENAMING_FORMATS)
