"""The report layer: the :class:`Report` every front end builds on, and what turns it into text.

* :mod:`~tiecheck.report.report`: the frozen, versioned ``Report``;
* :mod:`~tiecheck.report.render`: table, JSON, Markdown and CSV;
* :mod:`~tiecheck.report.text`: escaping of names taken from files, sizes in bytes and FLOPs;
* :mod:`~tiecheck.report.safewrite`: atomic writes that never overwrite an input.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["EXPECTATION_CODES", "FAIL_ON", "SCHEMA_VERSION", "Report"]


def __getattr__(name: str) -> Any:
    # Resolved on first use: the CLI imports report.text for every error line, and loading the
    # Report (with the findings catalogue) there would cost every `tiecheck --help` its time.
    if name in __all__:
        return getattr(import_module("tiecheck.report.report"), name)
    raise AttributeError(f"module 'tiecheck.report' has no attribute {name!r}")
