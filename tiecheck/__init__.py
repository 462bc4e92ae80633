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
        from tiecheck.api import analyze  # noqa: PLC0415 - `import tiecheck` stays light; the API is resolved on first use

        return analyze
    if name == "diff":
        from tiecheck.tie_diff import diff  # noqa: PLC0415 - `import tiecheck` stays light; the API is resolved on first use

        return diff
    if name == "Report":
        from tiecheck.report import Report  # noqa: PLC0415 - `import tiecheck` stays light; the API is resolved on first use

        return Report
    if name == "TiecheckError":
        from tiecheck.errors import TiecheckError  # noqa: PLC0415 - `import tiecheck` stays light; the API is resolved on first use

        return TiecheckError
    raise AttributeError(f"module 'tiecheck' has no attribute {name!r}")
