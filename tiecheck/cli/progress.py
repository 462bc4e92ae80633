"""A one-line progress bar on stderr for the commands' slow phases (every command that reads a target, and bench).

Drawn only on a terminal and never under CI (``CI`` set to anything but "" / "0" / "false"):
it goes to stderr and is cleared before any report is written, so JSON, CSV and table output
never carry it. The commands that read targets draw it only once a second has passed (``delay``):
a quick run prints nothing but its report, a slow one (importing torch and transformers on a
busy machine takes seconds) says what it is doing.
"""

from __future__ import annotations

import os
import sys
import threading
import time

# Seconds a command runs before its bar appears (``Progress(delay=...)`` for the commands).
SHOW_AFTER = 1.0


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

    def __init__(self, total: int, enabled: bool | None = None, width: int = 28, lines: bool = False,
                 delay: float = 0.0) -> None:
        self.total, self.done, self.width = max(total, 1), 0, width
        self.enabled = on_terminal() if enabled is None else enabled
        self.lines = lines
        self._last = ""
        self._shown = 0  # characters on the line now: a shorter label is padded over a longer one
        self._label = ""
        # Drawing waits until ``delay`` seconds have passed; a timer then draws the phase under way,
        # so a phase that started early and runs long (an import) is shown without another call.
        self._lock = threading.Lock()
        self._show_from = time.monotonic() + delay
        self._timer: threading.Timer | None = None
        if delay > 0 and self.enabled and not lines:
            self._timer = threading.Timer(delay, self._draw_pending)
            self._timer.daemon = True
            self._timer.start()

    def _draw_pending(self) -> None:
        with self._lock:
            if self._timer is not None and self._label:
                self._draw(self._label)

    def __call__(self, n: float, label: str) -> None:
        """``n`` more units done (a fraction where a phase reports from within), now doing ``label``."""
        with self._lock:
            self.done += n
            self._label = label
            if self.lines or time.monotonic() >= self._show_from:
                self._draw(label)

    def _draw(self, label: str) -> None:
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
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._clear()

    def _clear(self) -> None:
        if self.enabled and self._last and not self.lines:
            # clear all that was drawn, the padding of an earlier longer label included
            sys.stderr.write("\r" + " " * self._shown + "\r")
            sys.stderr.flush()


def command_progress(total: int) -> Progress:
    """The bar of a command that reads targets: ``total`` phases after a first one, the import of
    torch (and transformers for a Hugging Face folder), drawn once ``SHOW_AFTER`` seconds have passed."""
    bar = Progress(total, delay=SHOW_AFTER)
    bar(0, "starting (importing torch)")
    return bar
