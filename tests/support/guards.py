"""Helpers for the training-guard tests."""

from __future__ import annotations

from tiecheck.runtime import TieGuard


def record_checks(guard: TieGuard) -> list[str]:
    """The points the guard is checked at, in order, as the callbacks name them."""
    seen: list[str] = []
    check = guard.check

    def recording(where="check", **kw):
        seen.append(where)
        return check(where, **kw)

    guard.check = recording
    return seen
