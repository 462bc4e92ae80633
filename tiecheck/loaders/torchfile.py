"""Files written by ``torch.save``: state dicts, HF ``pytorch_model.bin``, training checkpoints.

Untrusted bytes never run code: the weights-only unpickler accepts tensors and plain
containers and refuses every other global. ``mmap=True`` maps tensor data instead of reading
it, so a 10 GB file costs almost no memory until a tensor's bytes are touched. Old non-zip
files cannot be mapped; they still load through the weights-only unpickler, without mmap.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.subject import Source, Subject

# Where training checkpoints keep the model, most specific first. Optimizer state is never a pick.
MODEL_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network",
              "generator", "ema", "model_ema", "ema_model")
NOT_MODEL_KEYS = re.compile(r"optim|scheduler|scaler|lr_|rng|loops|callbacks|hyper|args|config", re.I)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global|unsupported GLOBAL|GLOBAL)\s*:?\s*(?:GLOBAL\s+)?([\w.]+)")


def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def refusal_message(path: str, err: BaseException) -> str:
    m = _UNSUPPORTED_GLOBAL.search(str(err))
    what = f"the global '{m.group(1)}'" if m else "objects other than tensors"
    return (f"{path}: refused to unpickle {what}: a weights-only load accepts tensors and plain containers "
            f"only, and unpickling anything else can run arbitrary code. If you trust this file, rerun with "
            f"--trust-pickle")


def torch_load(path: str, *, trust_pickle: bool = False) -> tuple[Any, list[str]]:
    """``torch.load`` safely: weights-only and memory-mapped unless the user trusts the file."""
    import torch

    notes: list[str] = []
    kwargs = dict(map_location="cpu", weights_only=not trust_pickle)
    try:
        try:
            return torch.load(path, mmap=True, **kwargs), notes
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            notes.append("legacy (non-zip) torch.save format: loaded without memory mapping")
            return torch.load(path, mmap=False, **kwargs), notes
    except pickle.UnpicklingError as e:
        if not trust_pickle and "Weights only load failed" in str(e):
            raise UntrustedPickleError(refusal_message(path, e)) from e
        raise TargetError(f"{path}: not a readable torch.save file ({_first_line(e)})") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError,
            ImportError, TypeError, IndexError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise TargetError(f"{path}: not a readable torch.save file, truncated or corrupt "
                          f"({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _flatten(obj: Mapping, prefix: str = "") -> tuple[dict, int]:
    """Tensors of a (possibly nested) mapping under dotted names; count what is not a tensor."""
    out, skipped = {}, 0
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if _is_tensor(v):
            out[name] = v
        elif isinstance(v, Mapping):
            sub, s = _flatten(v, name + ".")
            out.update(sub)
            skipped += s
        else:
            skipped += 1
    return out, skipped


def _tensor_share(obj: Mapping) -> tuple[int, int]:
    tensors = sum(1 for v in obj.values() if _is_tensor(v))
    return tensors, len(obj)


def _looks_like_state_dict(obj) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors, total = _tensor_share(obj)
    return tensors > 0 and tensors >= total / 2 and all(isinstance(k, str) for k in obj)


def _describe_keys(obj: Mapping) -> str:
    keys = [str(k) for k in list(obj)[:12]]
    return ", ".join(keys) + (", ..." if len(obj) > 12 else "")


def pick_state(obj: Any, key: str | None, where: str) -> tuple[dict, str | None, list[str]]:
    """The model's name -> tensor mapping inside a loaded object, and the key that held it."""
    notes: list[str] = []
    if key is not None:
        cur = obj
        for part in key.split("."):
            if isinstance(cur, Mapping) and part in cur:
                cur = cur[part]
            elif isinstance(cur, Mapping) and part.isdigit() and int(part) in cur:
                cur = cur[int(part)]
            else:
                avail = _describe_keys(cur) if isinstance(cur, Mapping) else type(cur).__name__
                raise TargetError(f"{where}: no key '{key}' (available: {avail})")
        if not isinstance(cur, Mapping):
            raise TargetError(f"{where}: key '{key}' holds a {type(cur).__name__}, not a mapping of tensors")
        chosen, used = cur, key
    elif _looks_like_state_dict(obj):
        chosen, used = obj, None
    elif isinstance(obj, Mapping):
        chosen = used = None
        for k in MODEL_KEYS:
            v = obj.get(k)
            if isinstance(v, Mapping):
                inner, inner_key, inner_notes = _try_pick(v)
                if inner is not None:
                    chosen, used = inner, k + (f".{inner_key}" if inner_key else "")
                    break
        if chosen is None:
            # Otherwise the largest mapping of tensors that is not optimizer or scheduler state.
            best = None
            for k, v in obj.items():
                if isinstance(k, str) and not NOT_MODEL_KEYS.search(k) and _looks_like_state_dict(v):
                    if best is None or len(v) > len(obj[best]):
                        best = k
            if best is not None:
                chosen, used = obj[best], best
        if chosen is None:
            raise TargetError(f"{where}: found no model state dict (top-level keys: {_describe_keys(obj)}); "
                              f"choose one with --key")
        others = [str(k) for k in obj if str(k) != used.split(".")[0] and isinstance(obj[k], Mapping)]
        if others:
            notes.append(f"ignored other entries: {', '.join(others[:8])}")
    else:
        raise TargetError(f"{where}: holds a {type(obj).__name__}, not a state dict, a training checkpoint or "
                          f"an nn.Module")

    tensors, skipped = _flatten(chosen)
    if not tensors:
        raise TargetError(f"{where}: {'key ' + repr(used) if used else 'the file'} holds no tensors")
    if skipped:
        notes.append(f"skipped {skipped} non-tensor entr{'y' if skipped == 1 else 'ies'}")
    tensors, stripped = strip_wrapper_prefixes(tensors)
    if stripped:
        notes.append("stripped prefix " + " + ".join(f"'{p}'" for p in stripped) + " (DDP / torch.compile wrapper)")
    return tensors, used, notes


def _try_pick(v: Mapping):
    if _looks_like_state_dict(v):
        return v, None, []
    for k in ("state_dict", "model", "module"):
        if isinstance(v.get(k), Mapping) and _looks_like_state_dict(v[k]):
            return v[k], k, []
    return None, None, []


def strip_wrapper_prefixes(tensors: dict) -> tuple[dict, list[str]]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) when every key carries one."""
    stripped = []
    while tensors:
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in tensors):
                tensors = {k[len(p):]: v for k, v in tensors.items()}
                stripped.append(p)
                break
        else:
            break
    return tensors, stripped


def load_torch_file(path: str, *, key: str | None = None, trust_pickle: bool = False,
                    format_name: str = "torch.save") -> Subject:
    from torch import nn

    obj, notes = torch_load(path, trust_pickle=trust_pickle)
    if trust_pickle:
        notes.append("loaded with --trust-pickle: the file's pickled objects were allowed to run code")
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, Mapping) and key is None:
        mods = [k for k, v in obj.items() if isinstance(v, nn.Module)]
        if len(mods) == 1:
            module, key = obj[mods[0]], str(mods[0])
    if module is not None:
        from tiecheck.facts import module_tensors

        return Subject(tensors=module_tensors(module), module=module,
                       source=Source(target=path, format=f"{format_name} (pickled nn.Module)", key=key, notes=notes))
    tensors, used, more = pick_state(obj, key, path)
    fmt = format_name + (" training checkpoint" if used else " state dict")
    from tiecheck.fileview import file_spans

    return Subject(tensors=tensors, source=Source(target=path, format=fmt, key=used, notes=notes + more),
                   file_spans=file_spans(tensors, path))
