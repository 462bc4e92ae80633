"""What transformers' config class makes of a config.json with some keys rewritten.

``tiecheck fix`` unties or re-ties a Hugging Face folder by writing ``tie_word_embeddings`` into its
config.json. That only works where the config class takes the written value and reads nothing else
from it, and several do not (transformers 5): ``T5Config`` (and MT5, UMT5, LongT5, UDOP, Pop2Piano)
sets the flag true whatever config.json writes, BLT's configs set it false, and ``T5Config`` also
derives ``scale_decoder_outputs`` from the written flag when config.json leaves that key out, so
the copy would compute different logits. Rather than keep a list of such classes, the class is
asked: the folder's config.json is built as written and as fix would write it, and the two are
compared key by key. Read by ``repair/actions.py`` before anything is written; ``config_class`` and
``built_config`` also by ``hf_reconcile``, which asks the class what it makes of a flag that is no bool.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tiecheck.loaders.detect import HF_CONFIG
from tiecheck.loaders.hf_architecture import quiet_transformers
from tiecheck.loaders.safejson import parse_json

# The flag fix writes. A class may copy it into a sub-config (Pix2StructConfig's text_config): that
# change builds the model the edit asks for, so it is not held against the edit.
TIE_FLAG = "tie_word_embeddings"


def set_path(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``value`` at the dotted key path of a config dict (``text_config.tie_word_embeddings``)."""
    parts = dotted.split(".")
    cur = cfg
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


def config_class(cfg: Mapping[str, Any]) -> type | None:
    """transformers' config class for config.json's ``model_type``; None without transformers, or for a
    model type it does not ship."""
    try:
        from transformers.models.auto.configuration_auto import (  # noqa: PLC0415 - the `hf` extra
            CONFIG_MAPPING,
        )
    except ImportError:
        return None
    try:
        return CONFIG_MAPPING[cfg["model_type"]]
    except (KeyError, TypeError):
        return None


def built_config(cls: type, cfg: Mapping[str, Any]) -> Any | None:
    """``cls.from_dict`` of a copy of ``cfg``, with transformers kept quiet; None where the class refuses it.

    A copy: a class may write its defaults into the nested dicts it is given (InklingMMConfig).
    """
    try:
        with quiet_transformers():
            return cls.from_dict(copy.deepcopy(dict(cfg)))
    except Exception:  # noqa: BLE001 - a value or a config the class refuses: transformers builds nothing
        return None


def edit_refusal(folder: Path, edits: Mapping[str, Any], *, read_back: bool = True) -> str | None:
    """Why transformers would not build what writing ``edits`` into the folder's config.json asks for.

    Args:
        folder: a Hugging Face folder (its config.json is read).
        edits: dotted key path -> the value fix would write (``{"tie_word_embeddings": False}``).
        read_back: hold the class to reading each written value back. A declaration written for the
            readers of config.json (transformers 4, serving engines) need not be: where the files store
            two different copies, transformers 5 keeps them apart whatever the class makes of the flag.

    Returns:
        None where the config class reads each written value back and nothing else changes; else one
        sentence naming the class, the key and what it reads instead (or what else changes). None too
        where it cannot be asked (no transformers, a config class it does not ship, a config that does
        not build): the copy's verification still loads it and compares logits.
    """
    try:
        raw = parse_json((folder / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cls = config_class(raw) if isinstance(raw, dict) else None
    if cls is None:
        return None
    edited = copy.deepcopy(raw)
    for k, v in edits.items():
        set_path(edited, k, v)
    # A config the class refuses is left to the copy's verification.
    built = [built_config(cls, raw), built_config(cls, edited)]
    if None in built:
        return None
    before, after = (c.to_dict() for c in built)
    from transformers import __version__ as transformers_version  # noqa: PLC0415 - the `hf` extra, there
    name = f"{cls.__name__} (transformers {transformers_version})"
    for k, v in edits.items():
        read = _get_path(after, k)
        if read_back and read != v:
            return (f"{name} sets {k} to {value_text(read)} itself when config.json writes {value_text(v)}, so the "
                    f"copy would load as this folder does")
    for k, old, new in _changes(before, after):
        if k.rsplit(".", 1)[-1] != TIE_FLAG:
            return (f"writing {', '.join(f'{p}={value_text(v)}' for p, v in edits.items())} also changes {name}'s "
                    f"{k} from {value_text(old)} to {value_text(new)}, so the copy would compute different outputs")
    return None


def value_text(value: Any) -> str:
    """A config value as config.json spells it (str() for what JSON cannot hold, such as a dtype)."""
    return json.dumps(value, default=str)


def _get_path(cfg: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = cfg
    for p in dotted.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(p)
    return cur


def _changes(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, before, after) of every leaf that differs between two config dicts."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted({*a, *b}, key=str):
            yield from _changes(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    elif a != b:
        yield path, a, b


__all__ = ["built_config", "config_class", "edit_refusal", "set_path", "value_text"]
