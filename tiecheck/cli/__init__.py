"""The command line (``tiecheck``, ``python -m tiecheck.cli``): see :mod:`tiecheck.cli.main`."""

from __future__ import annotations

from tiecheck.cli.main import main

__all__ = ["main"]
