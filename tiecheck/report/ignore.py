"""Ignored findings: the escape hatch, as ruff has it (``ignore = ["TC005"]``, ``"TC005:*.rotary_emb.*"``).

A spec is a rule code, alone or with a glob over tensor names after a colon. A finding it
matches stays in the report, marked ``"ignored": true`` with the spec that matched, and never
counts toward the exit code or the summary's counts by severity.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiecheck.findings import RULES, Finding, SeverityCounts

if TYPE_CHECKING:  # pragma: no cover
    from tiecheck.report.report import Report


@dataclass(frozen=True)
class IgnoreSpec:
    """``TC005`` (every TC005) or ``TC005:*.rotary_emb.*`` (a TC005 naming a tensor the glob matches)."""

    code: str
    pattern: str | None
    text: str

    def matches(self, finding: Finding) -> bool:
        """True when the finding has this code and, with a pattern, names a tensor the pattern matches
        (``fnmatch``, case-sensitive: ``*`` crosses dots)."""
        if finding.code != self.code:
            return False
        return self.pattern is None or any(fnmatch.fnmatchcase(n, self.pattern) for n in finding.names)


def parse_ignore(text: str) -> IgnoreSpec:
    """One spec from its text.

    Raises:
        ValueError: not a known rule code, or an empty pattern after the colon (the message says what to write).
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string: write a rule code such as \"TC005\", or \"TC005:*.rotary_emb.*\"")
    code, sep, pattern = text.strip().partition(":")
    code = code.strip().upper()
    if code not in RULES:
        close = difflib.get_close_matches(code, list(RULES), n=1)
        raise ValueError(f"'{text}': {code or 'nothing'} is not a rule code" +
                         (f" (did you mean {close[0]}?)" if close else f"; codes are {min(RULES)}-{max(RULES)}") +
                         " (docs/findings.md)")
    if sep and not pattern.strip():
        raise ValueError(f"'{text}': nothing after the colon; write a glob over tensor names, e.g. {code}:*.rotary_emb.*")
    return IgnoreSpec(code, pattern.strip() if sep else None, text.strip())


def parse_ignores(texts: Iterable[str]) -> tuple[IgnoreSpec, ...]:
    return tuple(parse_ignore(t) for t in texts)


def with_ignored(report: Report, specs: Iterable[IgnoreSpec]) -> Report:
    """``report`` with every finding a spec matches marked ``ignored`` (and ``ignored_by``), the summary's
    counts by severity made of the findings left, and ``summary.findings_ignored`` their number."""
    specs = tuple(specs)
    if not specs:
        return report
    findings = []
    for f in report.findings:
        spec = next((s for s in specs if s.matches(f)), None)
        findings.append(f if spec is None else dataclasses.replace(f, ignored_by=spec.text))
    summary = dataclasses.replace(report.summary, findings=SeverityCounts.of(findings),
                                  findings_ignored=sum(f.ignored for f in findings))
    return dataclasses.replace(report, findings=tuple(findings), summary=summary)
