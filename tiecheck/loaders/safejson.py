"""JSON from untrusted files: configs, weight indexes, safetensors headers, ``.pt2`` records.

``json.loads`` recurses once per nesting level, so ``[[[[...]]]]`` a hundred thousand deep
raises ``RecursionError`` (not ``ValueError``) and would escape every ``except ValueError``.
Parsing here turns it into a ``ValueError`` like any other malformed JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def parse_json(raw: bytes | str, object_pairs_hook: Callable | None = None) -> Any:
    """Parse JSON; malformed, undecodable or too deeply nested input raises ValueError."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e
