"""Text for people: escaping of names taken from files, and sizes in bytes and FLOPs.

Every renderer (the inspect report, ``diff``, ``check``, errors on stderr, the bench tables)
formats through these few functions, so a tensor name that a hostile file fills with newlines
or terminal escape sequences is shown the same, harmless way everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

# Control characters (C0, DEL, C1) and the other characters str.splitlines() breaks at.
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_UNPRINTABLE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


# What json.dumps(ensure_ascii=False) leaves raw but a terminal may act on: DEL, the C1 controls
# (0x9b is a one-byte escape sequence) and the Unicode line separators. JSON syntax is ASCII, so
# these only occur inside strings, where a \u escape reads back as the same character.
_JSON_UNSAFE = {c: f"\\u{c:04x}" for c in [*range(0x7F, 0xA0), 0x2028, 0x2029]}


def escape_json(text: str) -> str:
    """JSON text from ``json.dumps(ensure_ascii=False)`` with the characters it leaves raw escaped."""
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
