"""``tiecheck scan``: every checkpoint of a fleet, one row each, on local processes or on Ray.

* ``targets``: what to scan (a folder tree walked for checkpoints, or a list of targets);
* ``row``: ``scan_target``, the one per-target function every engine runs, and the row it returns;
* ``engines``: ``run_pool`` (local processes) and ``run_ray`` (Ray tasks), rows as they finish;
* ``writers``: CSV, JSON lines and Parquet, written as rows come and resumable;
* :class:`Summary`: the closing line ("N checkpoints, X stored twice, K broken ties").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tiecheck.findings import SEVERITY_RANK
from tiecheck.report.text import human_bytes
from tiecheck.scan.engines import run, run_pool, run_ray
from tiecheck.scan.row import ROW_FIELDS, ScanOptions, scan_target
from tiecheck.scan.targets import discover, read_list

__all__ = ["ROW_FIELDS", "ScanOptions", "Summary", "discover", "read_list", "run", "run_pool", "run_ray",
           "scan_target"]


@dataclass
class Summary:
    """What a scan found, row by row, for its closing line and exit code."""

    fail_on: str = "error"
    skipped: int = 0  # targets already in the output (--resume)
    rows: int = 0
    unreadable: int = 0
    stored_twice: int = 0
    with_copies: int = 0
    broken: int = 0
    with_broken: int = 0
    failing: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if row["error"]:
            self.unreadable += 1
            self.failing += self.fail_on != "never"
            return
        twice, broken = int(row["bytes_stored_twice"]), int(row["broken_ties"])
        self.stored_twice += twice
        self.with_copies += twice > 0
        self.broken += broken
        self.with_broken += broken > 0
        self.verdicts[row["verdict"]] = self.verdicts.get(row["verdict"], 0) + 1
        if self.fail_on != "never":
            worst = "error" if int(row["errors"]) else "warning" if int(row["warnings"]) else None
            self.failing += worst is not None and SEVERITY_RANK[worst] >= SEVERITY_RANK[self.fail_on]

    @property
    def failed(self) -> bool:
        return self.failing > 0

    def line(self, output: str | None) -> str:
        """``scan: N checkpoints, X stored twice (in M), K broken ties (in J), E unreadable``."""
        parts = [f"{self.rows:,} checkpoint{'s' if self.rows != 1 else ''}",
                 f"{human_bytes(self.stored_twice)} stored twice" + (f" (in {self.with_copies:,})"
                                                                     if self.with_copies else ""),
                 f"{self.broken:,} broken tie{'s' if self.broken != 1 else ''}" + (f" (in {self.with_broken:,})"
                                                                                  if self.broken else "")]
        if self.unreadable:
            parts.append(f"{self.unreadable:,} unreadable")
        tail = f"; {self.skipped:,} already in {output}" if self.skipped else ""
        where = f"; rows in {output}" if output else ""
        return "scan: " + ", ".join(parts) + tail + where
