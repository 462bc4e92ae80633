"""Errors that reach the user as one clear line and exit code 2."""

from __future__ import annotations


class TiecheckError(Exception):
    """A problem with the user's input (target, option, file): not a bug in tiecheck.

    The CLI prints ``tiecheck: error: <message>`` and exits with code 2. Messages name the
    target and the cause, and where possible say what to do next.
    """

    exit_code = 2


class TargetError(TiecheckError):
    """The target could not be found, read or understood."""


class UntrustedPickleError(TargetError):
    """The file holds pickled Python objects that a weights-only load refuses."""
