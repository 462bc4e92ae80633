"""Text for people: escaping of names taken from files, and sizes in bytes and FLOPs.

Every renderer (the inspect report, ``diff``, ``check``, errors on stderr, the bench tables)
formats through these few functions, so a tensor name that a hostile file fills with newlines,
terminal escape sequences, bidirectional overrides or invisible characters is shown the same,
harmless and visible way everywhere. Markdown and CSV add their own escaping on top
(``markdown_text``, ``csv_cell``): a name must not become table syntax, HTML, a link or a formula.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Sequence
from typing import Any

# Control characters (C0, DEL, C1) and the other characters str.splitlines() breaks at.
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_UNPRINTABLE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


class _Escapes(dict):
    """``str.translate`` table: the fixed entries above, and any other format character (Unicode
    category Cf: the bidirectional overrides and isolates U+202A-U+202E and U+2066-U+2069, the
    zero-width space, joiners and marks, the byte order mark...) or separator other than the plain
    space, as a visible ``\\uXXXX``. U+202E shows a name reversed; a zero-width space makes two names
    look alike."""

    def __missing__(self, c: int) -> str | int:
        cat = unicodedata.category(chr(c))
        if cat == "Cf" or (cat in ("Zs", "Zl", "Zp") and c != 0x20):
            self[c] = escaped = f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"
            return escaped
        self[c] = c  # str.translate keeps the character (cached: a report may hold many non-ASCII names)
        return c


_UNPRINTABLE = _Escapes(_UNPRINTABLE)

# What json.dumps(ensure_ascii=False) leaves raw but a terminal may act on: DEL, the C1 controls
# (0x9b is a one-byte escape sequence), the Unicode line separators, and the format characters
# (bidirectional overrides, zero-width characters). JSON syntax is ASCII, so these only occur
# inside strings, where a \u escape reads back as the same character.
_JSON_UNSAFE = _Escapes({c: f"\\u{c:04x}" for c in [*range(0x7F, 0xA0), 0x2028, 0x2029]})


def escape_json(text: str) -> str:
    """JSON text from ``json.dumps(ensure_ascii=False)`` with the characters it leaves raw escaped.
    (ASCII text needs nothing but its DEL escaped: the json module escapes the other controls.)"""
    if text.isascii():
        return text.replace("\x7f", "\\u007f")
    return text.translate(_JSON_UNSAFE)


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as JSON text that is safe to print: readable UTF-8, every control character escaped."""
    return escape_json(json.dumps(obj, indent=indent, ensure_ascii=False)) + "\n"


def one_line(text: str) -> str:
    """``text`` as one printable line.

    Names and values quoted from a hostile file may hold newlines or terminal escape sequences,
    which must neither split a line of output nor reach the terminal.
    """
    return text.strip().translate(_UNPRINTABLE)


def clean(value: Any) -> Any:
    """``value`` with every string in it made printable (see :func:`one_line`), through dicts,
    lists, tuples and dataclass instances (a copy); other values unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: clean(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, str):
        return value if value.isprintable() else one_line(value)
    if isinstance(value, dict):
        return {clean(k): clean(x) for k, x in value.items()}  # keys are often tensor names
    if isinstance(value, (list, tuple)):
        return type(value)(clean(x) for x in value)
    return value


# Markdown: what would make a name table syntax (|), raw HTML (<img onerror=...>), a link or an
# image ([x](javascript:...)), or undo these escapes (a backslash). GitHub renders \| inside tables
# and the entities as the characters they stand for.
_MARKDOWN = {ord("\\"): "\\\\", ord("|"): "\\|", ord("["): "\\[", ord("]"): "\\]", ord("<"): "&lt;",
             ord(">"): "&gt;", ord("&"): "&amp;"}


def markdown_text(value: Any) -> Any:
    """``clean(value)`` with every string also escaped for Markdown (see ``_MARKDOWN``)."""
    value = clean(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: markdown_text(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, str):
        return value.translate(_MARKDOWN)
    if isinstance(value, dict):
        return {markdown_text(k): markdown_text(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(markdown_text(x) for x in value)
    return value


# OWASP's CSV injection rule: a cell a spreadsheet would read as a formula (=, +, -, @, or a tab or
# carriage return first) is prefixed with a single quote, which makes it text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell: a string escaped as ``clean`` does, then made inert for spreadsheets."""
    value = clean(value)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def human_bytes(n: int | float) -> str:
    """Bytes in binary units: ``1,536 B`` stays bytes below 1 KiB, then ``1.50 KiB``, ``2.00 MiB``..."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:,.2f} TiB"


def human_flops(n: float) -> str:
    """FLOPs in decimal units (kFLOP ... PFLOP), as papers and datasheets give them."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} FLOP"


def shape_text(shape: Sequence[int] | None) -> str:
    """``[50257, 768]`` as ``50257×768``; an empty shape is a scalar."""
    return "×".join(str(x) for x in shape) if shape else "scalar"
