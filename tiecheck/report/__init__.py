"""The report layer: the :class:`Report` every front end builds on, and what turns it into text.

* :mod:`~tiecheck.report.report`: the frozen, versioned ``Report``;
* :mod:`~tiecheck.report.render`: table, JSON, Markdown and CSV;
* :mod:`~tiecheck.report.text`: escaping of names taken from files, sizes in bytes and FLOPs;
* :mod:`~tiecheck.report.safewrite`: atomic writes that never overwrite an input.
"""

from __future__ import annotations

from tiecheck.report.report import EXPECTATION_CODES, FAIL_ON, SCHEMA_VERSION, Report

__all__ = ["EXPECTATION_CODES", "FAIL_ON", "SCHEMA_VERSION", "Report"]
