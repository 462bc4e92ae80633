"""PEFT adapter folders: ``adapter_config.json`` beside ``adapter_model.safetensors``.

The config is read with ``peft.PeftConfig.from_pretrained`` (offline on a local folder), so the
fields mean what peft means by them; the weights are the safetensors file's, mapped like any
other. An adapter alone says which modules it trains or saves whole (``target_modules``,
``modules_to_save``); whether that touches a tie is known only against the base model
(``--base``): the pure half of that is ``analyses/adapter.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tiecheck.errors import TargetError
from tiecheck.facts import Source
from tiecheck.findings import finding
from tiecheck.loaders.content import TorchContentReader
from tiecheck.loaders.formats.safetensors_files import load_safetensors_file
from tiecheck.loaders.safejson import parse_json
from tiecheck.loaders.subject import Subject

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONFIG_LIMIT = 16 << 20  # as for config.json: adapter configs are a few kilobytes
PREFIX = "base_model.model."  # peft's prefix on every saved key
# The part of a saved key that names the adapter's own tensors, not the base module's.
_ADAPTER_PART = re.compile(r"\.(lora_[A-Za-z_]+|lora_embedding_[AB]|modules_to_save|original_module)(\.|$)")


def check_config_json(path: Path) -> None:
    """``adapter_config.json`` parsed by tiecheck first, within the bounds of ``config.json``: peft
    reads it with ``json.load``, whose RecursionError on JSON nested 100,000 deep escapes every
    ``except ValueError``, and which reads a file of any size whole.

    Raises:
        TargetError: too large, not JSON, nested too deeply, or not a JSON object.
    """
    p = path / ADAPTER_CONFIG
    try:
        with open(p, "rb") as fh:
            raw = fh.read(min(os.fstat(fh.fileno()).st_size, CONFIG_LIMIT) + 1)
    except OSError as e:
        raise TargetError(f"{p}: cannot read ({e.strerror or e})") from e
    if len(raw) > CONFIG_LIMIT:
        raise TargetError(f"{p}: larger than {CONFIG_LIMIT:,} bytes; an adapter config is a few kilobytes, so this "
                          f"is not one")
    try:
        obj = parse_json(raw)
    except ValueError as e:
        raise TargetError(f"{p}: peft cannot read this adapter config (not valid JSON: {e}); fix or re-save it "
                          f"with peft") from e
    if not isinstance(obj, dict):
        raise TargetError(f"{p}: holds a JSON {type(obj).__name__}, not an object")


def read_config(path: Path) -> Any:
    """The adapter's PeftConfig, as peft reads it; one line for anything peft refuses."""
    try:
        import peft  # noqa: PLC0415 - optional extra, only for adapter folders
    except ImportError as e:
        raise TargetError(f"{path}: a PEFT adapter folder; reading it needs peft: pip install 'tiecheck[peft]'") \
            from e
    check_config_json(path)
    try:
        return peft.PeftConfig.from_pretrained(str(path))
    except (ValueError, TypeError, KeyError, OSError, RecursionError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TargetError(f"{path / ADAPTER_CONFIG}: peft cannot read this adapter config ({first}); fix or "
                          f"re-save it with peft") from e


def module_of(key: str) -> str:
    """The base module a saved adapter key belongs to (``base_model.model.lm_head.weight`` -> ``lm_head``)."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    m = _ADAPTER_PART.search(name)
    if m:
        return name[:m.start()]
    return name.rsplit(".", 1)[0] if "." in name else ""


def base_name(key: str) -> str:
    """The base model's name for a tensor saved whole (``modules_to_save``): the key without peft's prefix."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def _as_list(value: Any, field: str, path: Path) -> list[str] | str | None:
    """A module list of the config: None, a regular expression, or names. peft reads a config whose
    lists hold other values (``"target_modules": false``) without complaint; tiecheck says which field."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value)
    raise TargetError(f"{path / ADAPTER_CONFIG}: {field} is {type(value).__name__} {str(value)[:60]!r}; peft expects a "
                      f"module name, a list of names or a regular expression there: fix or re-save the adapter")


def load_adapter(path: Path) -> Subject:
    """An adapter folder as a Subject: its saved tensors, its config's declarations, and ``extra["peft"]``."""

    cfg = read_config(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise TargetError(f"{path}: {ADAPTER_CONFIG} without {ADAPTER_WEIGHTS}; save the adapter with peft's "
                          f"save_pretrained (safetensors is its default)")
    sub = load_safetensors_file(weights)
    info = {
        "peft_type": str(getattr(cfg, "peft_type", "") or "").replace("PeftType.", ""),
        "base_model_name_or_path": getattr(cfg, "base_model_name_or_path", None),
        "target_modules": _as_list(getattr(cfg, "target_modules", None), "target_modules", path),
        "exclude_modules": _as_list(getattr(cfg, "exclude_modules", None), "exclude_modules", path),
        "modules_to_save": _as_list(getattr(cfg, "modules_to_save", None), "modules_to_save", path),
        "ensure_weight_tying": bool(getattr(cfg, "ensure_weight_tying", False)),
        "saved_modules": sorted({module_of(k) for k in sub.tensors}),
        # name in the base model -> the adapter key that stores it whole
        "full_copies": {base_name(k): k for k in sub.tensors if not _ADAPTER_PART.search(k[len(PREFIX):] if
                                                                                         k.startswith(PREFIX) else k)},
    }
    decls = [{"kind": f"peft_{field}", "value": info[field], "origin": {"file": ADAPTER_CONFIG, "key": field}}
             for field in ("modules_to_save", "target_modules") if info[field]]
    notes = [f"PEFT adapter ({info['peft_type'] or 'unknown type'}) read with peft; base model "
             f"{info['base_model_name_or_path'] or 'not named'}; target_modules {info['target_modules'] or '-'}, "
             f"modules_to_save {info['modules_to_save'] or '-'}"]
    copies = info["full_copies"]
    if copies:
        nbytes = sum(sub.tensors[k].numel() * sub.tensors[k].element_size() for k in copies.values())
        notes.append(f"the adapter stores {len(copies)} tensor{'s' if len(copies) != 1 else ''} whole "
                     f"({', '.join(sorted(copies))}; {nbytes:,} bytes): pass --base to hold them against the "
                     f"base model's ties")
    findings = list(sub.loader_findings) + _missing_without_base(info)
    notes += sub.source.notes
    return Subject(tensors=sub.tensors, source=Source(target=str(path), format="PEFT adapter (safetensors)",
                                                      notes=notes),
                   extra={**sub.extra, "peft": info}, file_spans=sub.file_spans, loader_findings=findings,
                   declarations=decls)


def _missing_without_base(info: dict) -> list:
    """Entries of the config that no saved tensor answers (checked against the base with --base)."""
    out = []
    saved = info["saved_modules"]
    for field in ("modules_to_save", "target_modules"):
        wanted = info[field]
        if not isinstance(wanted, list):
            continue  # a regex (or None): matched against the base's modules only
        for m in wanted:
            if not any(s == m or s.endswith("." + m) for s in saved):
                out.append(finding("TC024", f"{ADAPTER_CONFIG} {field} names {m!r}, but the adapter saves no "
                                            f"tensor for a module of that name", [m],
                                   hint="Fix the name in adapter_config.json, or re-save the adapter with peft "
                                        "(peft refuses to load a config whose modules the base model lacks)."))
    return out


def adapter_bytes(subject: Subject) -> dict[str, int]:
    """Base module path -> bytes the adapter stores for it (LoRA factors, or the whole saved module)."""
    out: dict[str, int] = {}
    for k, t in subject.tensors.items():
        mod = module_of(k)
        out[mod] = out.get(mod, 0) + t.numel() * t.element_size()
    return out


def copies_equal(subject: Subject, base: Subject) -> dict[str, bool | None]:
    """For each tensor the adapter saves whole: whether it equals the base model's (None: not comparable)."""

    out: dict[str, bool | None] = {}
    for name, key in subject.extra.get("peft", {}).get("full_copies", {}).items():
        a, b = subject.tensors.get(key), base.tensors.get(name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype or "meta" in (a.device.type,
                                                                                             b.device.type):
            out[name] = None
            continue
        spans = {k: s for k, s in (("a", subject.file_spans.get(key)), ("b", base.file_spans.get(name))) if s}
        with TorchContentReader({"a": a, "b": b}, spans) as reader:
            out[name] = reader.equal("a", "b")
    return out
