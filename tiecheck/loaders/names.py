"""Bounds on the tensor names a file can state.

Names reach regular expressions (transformers' load-time key renaming, tiecheck's role patterns),
tables and error lines; a single name of 1.7 MB made transformers' key conversion run for minutes
(its patterns cost time quadratic in the name). Real tensor names are under 300 characters, so a
name longer than ``MAX_NAME_CHARS`` is refused before anything else reads it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tiecheck.errors import TargetError

MAX_NAME_CHARS = 4096


def check_names(names: Iterable[object], where: str) -> None:
    """Refuse a tensor name longer than ``MAX_NAME_CHARS``.

    Args:
        names: the names a loader read (non-strings are skipped: they are not matched against patterns).
        where: the file or folder, for the message.

    Raises:
        TargetError: one name is too long; the message shows its start, escaped.
    """
    for name in names:
        if isinstance(name, str) and len(name) > MAX_NAME_CHARS:
            raise TargetError(f"{where}: a tensor name is {len(name):,} characters long "
                              f"({name[:48]!r}...); tiecheck reads names of at most {MAX_NAME_CHARS:,} "
                              f"characters (real ones are under 300), so the file is refused")
