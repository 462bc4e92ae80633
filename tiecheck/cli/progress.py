"""A one-line progress bar on stderr for the commands' slow phases (bench, inspect).

Drawn only on a terminal and never under CI (``CI`` set to anything but "" / "0" / "false"):
it goes to stderr and is cleared before any report is written, so JSON, CSV and table output
never carry it.
"""

from __future__ import annotations

import os
import sys


def on_terminal() -> bool:
    """True when stderr is a terminal and the CI environment variable is not set."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal and CI is not set.

    Redirected output (CI logs, ``2> file``) and CI=true get nothing: a bar there is noise. ``lines``
    writes one plain line per change of phase instead, flushed at once, so a log cut short by
    a time limit still shows how far the run got.

    A phase may report from within (``tiecheck.api.Phase``: fractions of its unit, at most about
    one call per 1% of its items, the count in the label), so the bar moves during a long
    read or content pass; a redraw happens only when the drawn line changes.
    """

    def __init__(self, total: int, enabled: bool | None = None, width: int = 28, lines: bool = False) -> None:
        self.total, self.done, self.width = max(total, 1), 0, width
        self.enabled = on_terminal() if enabled is None else enabled
        self.lines = lines
        self._last = ""
        self._shown = 0  # characters on the line now: a shorter label is padded over a longer one

    def __call__(self, n: float, label: str) -> None:
        """``n`` more units done (a fraction where a phase reports from within), now doing ``label``."""
        self.done += n
        if self.lines:
            if label != self._last:
                sys.stderr.write(f"[{min(self.done / self.total, 1.0):4.0%}] {label}\n")
                sys.stderr.flush()
                self._last = label
            return
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * self.width)
        line = f"\r[{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%} {label}"
        if line != self._last:
            written = line.ljust(self._shown)
            sys.stderr.write(written)
            self._shown = len(written)
            sys.stderr.flush()
            self._last = line

    def close(self) -> None:
        if self.enabled and self._last and not self.lines:
            # clear all that was drawn, the padding of an earlier longer label included
            sys.stderr.write("\r" + " " * self._shown + "\r")
            sys.stderr.flush()
