"""tiecheck: find, measure and guard weight tying in PyTorch Transformers.

The package imports nothing heavy at import time, so `tiecheck --help` and
`tiecheck models` start without loading torch. `analyze` and `Report` are
resolved lazily on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "analyze", "diff", "Report", "TiecheckError"]


def __getattr__(name: str):
    if name == "analyze":
        from tiecheck.api import analyze

        return analyze
    if name == "diff":
        from tiecheck.tie_diff import diff

        return diff
    if name == "Report":
        from tiecheck.report import Report

        return Report
    if name == "TiecheckError":
        from tiecheck.errors import TiecheckError

        return TiecheckError
    raise AttributeError(f"module 'tiecheck' has no attribute {name!r}")
