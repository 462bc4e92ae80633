"""One target in, one row out: the per-target function every scan engine runs.

``scan_target`` is what a worker of the process pool and a Ray task both call, so the two
engines give the same rows. It never raises for a target: a target that cannot be read is a
row with its error, and only a crash of the process itself (which the engines turn into a row
too) loses its answer.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiecheck.analyses.layers import TWO_EQUAL
from tiecheck.errors import TiecheckError
from tiecheck.report.text import one_line

if TYPE_CHECKING:  # pragma: no cover - the report is built in the worker, by analyze's lazy import
    from tiecheck.report import Report

# The row's columns, in order (CSV header, Parquet schema, JSON keys).
ROW_FIELDS = ("target", "format", "tensors", "bytes", "bytes_stored_twice", "tie_groups", "verdict", "broken_ties",
              "errors", "warnings", "infos", "findings", "bytes_fetched", "seconds", "error")
INT_FIELDS = ("tensors", "bytes", "bytes_stored_twice", "tie_groups", "broken_ties", "errors", "warnings", "infos",
              "bytes_fetched")

# Findings that say a tie is broken: the model loads, or is served, with weights other than the
# ones a tie would give (docs/findings.md). TC005 counts only as an error, where the copies are an
# embedding and its output projection (a warning is a wasted copy, counted in bytes stored twice).
BROKEN_TIE = frozenset({
    "TC002",  # distinct Parameters over one memory: gradients not shared
    "TC009",  # an expected tie missing
    "TC010",  # a tie stored twice with different content
    "TC011",  # the config's tie setting against the architecture or the files
    "TC015",  # a declared tie contradicted by the files
    "TC017",  # declared untied, one copy stored: the other initialised randomly
    "TC018",  # declared untied, but shared
    "TC020",  # an alias map naming a tensor the file does not hold
    "TC025",  # one tied Parameter in two FSDP2 units
})
VERDICTS = ("broken", "stored twice", "tied", "untied")


@dataclass(frozen=True)
class ScanOptions:
    """What every target of a scan is read with (picklable: it travels to the workers)."""

    duplicates: bool = True  # the content pass: finds the copies counted in bytes_stored_twice


def scan_target(target: str, options: ScanOptions = ScanOptions()) -> dict[str, Any]:
    """Analyse one target and describe it as a row; an unreadable target gives a row with its error.

    Args:
        target: anything ``tiecheck inspect`` takes (a path, a Hub id, a URL, a spec).
        options: how every target of the scan is read.

    Returns:
        A dict with every key of ``ROW_FIELDS``: plain ints and strings, so every engine can ship it.
    """
    # The boundary where the work starts: analyze imports torch (a worker pays it once).
    from tiecheck.api import analyze  # noqa: PLC0415

    t0 = time.perf_counter()
    try:
        report = analyze(target, duplicates=options.duplicates, flops=False)
    except TiecheckError as e:
        return error_row(target, one_line(str(e)), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - one target must not end the scan; the row names what happened
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        return error_row(target, f"unexpected {type(e).__name__}: {msg}", time.perf_counter() - t0)
    return report_row(target, report, time.perf_counter() - t0)


def report_row(target: str, report: Report, seconds: float) -> dict[str, Any]:
    """The row of one report."""
    findings = report.findings
    broken = sum(1 for f in findings if f.code in BROKEN_TIE or (f.code == "TC005" and f.severity == "error"))
    twice = stored_twice(report)
    counts = Counter(f.severity for f in findings)
    declared_ties = [t for t in (report.declared.ties if report.declared else ()) if t.declared]
    verdict = ("broken" if broken else "stored twice" if twice else
               "tied" if report.tie_groups or declared_ties else "untied")
    return {"target": target, "format": report.source.format, "tensors": len(report.tensors),
            "bytes": report.summary.bytes_unique, "bytes_stored_twice": twice, "tie_groups": len(report.tie_groups),
            "verdict": verdict, "broken_ties": broken, "errors": counts["error"], "warnings": counts["warning"],
            "infos": counts["info"], "findings": " ".join(sorted({f.code for f in findings})),
            "bytes_fetched": (report.extra.get("remote") or {}).get("bytes_fetched", 0), "seconds": round(seconds, 3),
            "error": ""}


def error_row(target: str, error: str, seconds: float = 0.0) -> dict[str, Any]:
    """The row of a target that could not be read."""
    row = {**{k: 0 for k in INT_FIELDS}, "target": target, "format": "", "verdict": "", "findings": "",
           "seconds": round(seconds, 3), "error": error}
    return {k: row[k] for k in ROW_FIELDS}


def stored_twice(report: Report) -> int:
    """Bytes a checkpoint stores a second time: untied duplicates and transposed copies the content
    pass found, and declared ties whose two names the files store as equal copies (a pair the
    duplicate pass already counted is not counted again)."""
    s = report.summary
    total = s.bytes_wasted_by_duplicates + s.bytes_wasted_by_transposed_copies
    groups = [set(g.names) for g in report.untied_duplicates if not g.constant]
    for t in report.declared.ties if report.declared else ():
        if t.declared and t.stored == TWO_EQUAL and not any(set(t.names) <= g for g in groups):
            total += t.nbytes
    return total
