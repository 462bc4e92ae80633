"""Errors that reach the user as one clear line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TiecheckError(Exception):
    """A problem with the user's input (target, option, file): not a bug in tiecheck.

    The CLI prints ``tiecheck: error: <message>`` and exits with code 2. Messages name the
    target and the cause, and where possible say what to do next.
    """

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a mistyped ``word``, else ``""``.

    Args:
        word: what the user typed.
        choices: the names that exist.

    Returns:
        The suggestion, ready to append to an error message.
    """
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


class TargetError(TiecheckError):
    """The target could not be found, read or understood."""


class UntrustedPickleError(TargetError):
    """The file holds pickled Python objects that a weights-only load refuses."""
