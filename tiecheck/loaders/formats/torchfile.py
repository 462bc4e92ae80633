"""Files written by ``torch.save``: state dicts, HF ``pytorch_model.bin``, training checkpoints.

Untrusted bytes never run code: the weights-only unpickler accepts tensors and plain
containers and refuses every other global. ``mmap=True`` maps tensor data instead of reading
it, so a 10 GB file costs almost no memory until a tensor's bytes are touched. Old non-zip
files cannot be mapped; they still load through the weights-only unpickler, without mmap.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import re
import tarfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tiecheck.errors import TargetError, UntrustedPickleError, did_you_mean
from tiecheck.facts import Source
from tiecheck.loaders.declared import megatron_declarations
from tiecheck.loaders.fileview import file_spans
from tiecheck.loaders.formats.archive_tensors import TensorRecord
from tiecheck.loaders.formats.torchzip import PickleRefusal, TorchRules, read_archive, vet_archive
from tiecheck.loaders.pickleloop import Budget, Refused, check_containers
from tiecheck.loaders.pickleloop import load as pickle_load
from tiecheck.loaders.pickles import describe, first_refused
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import module_tensors
from tiecheck.loaders.zipcheck import ZipArchive

# Where training checkpoints keep the model, most specific first. Optimizer state is never a pick.
MODEL_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network",
              "generator", "ema", "model_ema", "ema_model")
NOT_MODEL_KEYS = re.compile(r"optim|scheduler|scaler|lr_|rng|loops|callbacks|hyper|args|config", re.I)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LEGACY_PICKLES = 5  # magic number, protocol version, system info, the object, the storage keys; then raw data

# Inner messages of the weights-only unpickler that mean "refused", not "damaged".
_REFUSALS = ("Unsupported global", "unsupported GLOBAL", "unrecognized function", "Can only create new object",
             "Only persistent_load of storage", "Unsupported operand 147")


def _is_tensor(x) -> bool:
    return isinstance(x, (torch.Tensor, TensorRecord))


def refusal_message(path: str, what: str) -> str:
    return (f"{path}: refused to unpickle {what}: a weights-only load accepts tensors and plain containers "
            f"only, and unpickling anything else can run arbitrary code. If you trust this file, rerun with "
            f"--trust-pickle")


def refused_global_message(path: str, data, base: int = 0, record: str = "", of: str = "the file") -> str | None:
    """The refusal naming the first global of the pickle(s) in ``data`` a weights-only load refuses,
    and where it sits: ``base`` is the offset of ``data`` in the file, ``record`` the zip record."""

    g = first_refused(data, base)
    if g is None:
        return None
    where = f"{record}, " if record else ""
    return refusal_message(path, f"the global {describe(g)} ({where}byte {g.offset:,} of {of})")


def unpickler_cause(e: BaseException) -> str:
    """What the weights-only unpickler objected to, without torch's paragraphs of advice.

    torch re-raises the unpickler's error inside a long message (``raise ... from None``); the
    original is still the exception's context.
    """
    inner = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e
    for line in str(inner).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            line = line[len("WeightsUnpickler error:"):].strip()
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "(1)", "(2)",
                                         "In PyTorch 2.6", "Please file an issue")):
            return line[:300]
    return _first_line(inner)


def _pickle_record(za) -> str:
    """The record torch unpickles: ``<root>/data.pkl`` of the archive's single root folder."""
    pkls = [n for n in za.names() if n.count("/") == 1 and n.endswith("/data.pkl")]
    roots = {n.split("/", 1)[0] for n in za.names()}
    if len(pkls) != 1 or len(roots) != 1:
        raise TargetError(f"{za.label}: not a torch.save archive: expected one root folder holding data.pkl, found "
                          f"{len(roots)} folder(s) and {len(pkls)} data.pkl record(s)")
    return pkls[0]


def _check_legacy(path: str) -> None:
    """torch.load tries a legacy file as a tar first (torch < 0.4) and extracts it into a temporary folder."""

    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:"):
            pass
    except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeDecodeError):
        return
    raise UntrustedPickleError(f"{path}: a tar-format torch.save file (torch < 0.4); torch reads it only by "
                               f"unpickling arbitrary objects, after extracting it into a temporary folder. If you "
                               f"trust this file, rerun with --trust-pickle")


def _load_error(label: str, kind: str | None, e: Exception, trust_pickle: bool, source) -> TargetError:
    """One line for a failed torch.load: the refused global, named, or what is damaged."""
    text = str(e)
    if not trust_pickle and "Weights only load failed" in text:
        cause = unpickler_cause(e)
        named = _refused_global(label, kind, source)
        if named:
            return UntrustedPickleError(named)
        if cause.startswith(_REFUSALS):
            return UntrustedPickleError(refusal_message(label, f"what the pickle asks for ({cause})"))
        return TargetError(f"{label}: not a readable torch.save file, truncated or corrupt ({cause})")
    missing = _missing_class(label, e) if trust_pickle else None
    return missing or TargetError(f"{label}: not a readable torch.save file, truncated or corrupt ({_cause(e)})")


_NO_ATTRIBUTE = re.compile(r"Can't get attribute '([\w.]+)' on <module '([\w.]+)'")


def _missing_class(label: str, e: BaseException) -> TargetError | None:
    """A trusted pickle that names a class the import path lacks: the file is fine, say so."""
    cause = e
    while cause is not None and not isinstance(cause, (ModuleNotFoundError, AttributeError)):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ModuleNotFoundError) and cause.name:
        return TargetError(f"{label}: the file is fine, but it pickles a class from module '{cause.name}', which is "
                           f"not on the import path; run from the folder that holds {cause.name.split('.')[0]} (or "
                           f"set PYTHONPATH), or save the state_dict() instead")
    m = _NO_ATTRIBUTE.search(str(cause)) if isinstance(cause, AttributeError) else None
    if m:
        return TargetError(f"{label}: the file is fine, but it pickles {m.group(2)}.{m.group(1)}, which module "
                           f"'{m.group(2)}' on the import path does not define (renamed or moved?); import the "
                           f"right version of it, or save the state_dict() instead")
    return None


def _refused_global(label: str, kind: str | None, source) -> str | None:
    """Walk the file's pickle (``source``: a path or the bytes of an in-memory payload) for a refused global."""


    try:
        if kind == "zip":
            fh = io.BytesIO(source) if isinstance(source, bytes) else source
            with ZipArchive(fh, label) as za:
                rec = _pickle_record(za)
                span = za.span(rec)
                data = za.read(rec, limit=za.size)
            of = "the record" if isinstance(source, bytes) else "the file"
            return refused_global_message(label, data, span[0] if span else 0, record="data.pkl", of=of)
        if isinstance(source, bytes):
            return refused_global_message(label, source, of="the record")
        with open(source, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return refused_global_message(label, m)
    except (TargetError, OSError, ValueError):
        return None


def _kind_of(head: bytes) -> str | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "legacy"
    return None


def _guarded_load(source, label: str, kind: str | None, trust_pickle: bool) -> Any:
    """torch.load with every failure as one TargetError (warnings become notes in ``load_path``).

    Without ``trust_pickle`` the file's pickles are first run through ``pickleloop``'s bounds (the
    loop builds nothing here): torch's own unpickler keeps every object a file asks for, so a few
    kilobytes could otherwise make it build gigabytes.
    """
    if kind == "zip":
        with ZipArchive(io.BytesIO(source) if isinstance(source, bytes) else source, label) as za:
            za.check_all()
            _pickle_record(za)
            vet_archive(za, trusted=trust_pickle)
    elif kind == "legacy" and not trust_pickle:
        _vet_legacy(source, label)
    try:
        obj = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source,
                         mmap=kind == "zip" and not isinstance(source, bytes), map_location="cpu",
                         weights_only=not trust_pickle)
    except Exception as e:
        raise _load_error(label, kind, e, trust_pickle, source) from e
    try:
        check_containers(obj)
    except Refused as e:
        raise TargetError(f"{label}: the pickle {e.why}") from e
    return obj


def _vet_legacy(source, label: str) -> None:
    """The pickles of a legacy torch.save file (magic number, protocol, system info, the object,
    the storage keys) run through the loop's bounds before torch.load reads them."""
    try:
        if isinstance(source, bytes):
            _vet_pickles(source, label)
            return
        with open(source, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            _vet_pickles(m, label)
    except (OSError, ValueError) as e:
        raise TargetError(f"{label}: cannot read ({getattr(e, 'strerror', None) or e})") from e


def _vet_pickles(data, label: str) -> None:
    budget = Budget(len(data))
    pos = 0
    for i in range(LEGACY_PICKLES):
        if pos >= len(data) or (i and data[pos] != 0x80):
            return  # fewer pickles than a torch.save file holds: torch.load says what the file is
        start = pos
        try:
            _, pos = pickle_load(data, TorchRules(build=False), budget, pos)
        except Refused as e:
            raise PickleRefusal.of(e, label, "the pickle", start, data[start:]) from e


def torch_load(path: str, *, trust_pickle: bool = False) -> tuple[Any, list[str]]:
    """``torch.load`` safely: weights-only, and memory-mapped for zip files, unless the user trusts the file.

    The format is decided by the file's first bytes, not by retrying on errors: a zip archive is
    checked record by record first (see ``zipcheck``) and mapped; a legacy file cannot be mapped
    and is read through the weights-only unpickler as it is. Anything torch.load raises on a
    damaged file becomes one TargetError.
    """
    notes: list[str] = []
    try:
        with open(path, "rb", buffering=0) as fh:
            kind = _kind_of(fh.read(8))
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e.strerror or e})") from e
    if kind == "legacy":
        if not trust_pickle:
            _check_legacy(path)
        notes.append("legacy (non-zip) torch.save format: loaded without memory mapping")
    return _guarded_load(path, path, kind, trust_pickle), notes


def load_payload(data: bytes, label: str, *, trust_pickle: bool = False) -> Any:
    """A ``torch.save`` payload held in memory (a record of another archive), by the same rules."""
    return _guarded_load(data, label, _kind_of(data[:8]), trust_pickle)


def _first_line(e) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _cause(e: BaseException) -> str:
    """``Type: first line`` of an exception, or just ``Type`` when it carries no message."""
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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


_OPTIMIZER_SLOTS = frozenset({"step", "exp_avg", "exp_avg_sq", "momentum_buffer", "square_avg", "sum", "max_exp_avg_sq"})


def is_optimizer_state(obj: Any) -> bool:
    """A torch.optim ``state_dict()`` (``state`` + ``param_groups``) or its ``state`` part
    (parameter index -> step and moments): tensors, but no model's."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if "param_groups" in obj and "state" in obj:
        return True
    return all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in obj) and \
        all(isinstance(v, Mapping) and _OPTIMIZER_SLOTS & set(map(str, v)) for v in obj.values())


def model_state_keys(obj: Any) -> list[str]:
    """Top-level keys of a checkpoint that hold a model state dict, for messages."""
    if not isinstance(obj, Mapping):
        return []
    return [str(k) for k, v in obj.items()
            if isinstance(v, Mapping) and not is_optimizer_state(v) and _try_pick(v)[0] is not None]


def _no_key(where: str, key: str, part: str, cur: Any) -> TargetError:
    if not isinstance(cur, Mapping):
        return TargetError(f"{where}: no key '{key}' (available: {type(cur).__name__})")
    guess = did_you_mean(part, [str(k) for k in cur])
    return TargetError(f"{where}: no key '{key}' (available: {_describe_keys(cur)}){guess}")


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
                raise _no_key(where, key, part, cur)
        if is_optimizer_state(cur):
            models = model_state_keys(obj)
            listed = (f"the model states in this file: {', '.join(models)} (e.g. --key {models[0]})" if models
                      else "this file holds no model state dict at its top level")
            raise TargetError(f"{where}: key '{key}' holds optimizer state (torch.optim state_dict: per-parameter "
                              f"step and moments), not model weights; {listed}")
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
                inner, inner_key, _inner_notes = _try_pick(v)
                if inner is not None:
                    chosen, used = inner, k + (f".{inner_key}" if inner_key else "")
                    break
        if chosen is None:
            # Otherwise the largest mapping of tensors that is not optimizer or scheduler state.
            best = None
            for k, v in obj.items():
                if isinstance(k, str) and not NOT_MODEL_KEYS.search(k) and _looks_like_state_dict(v) and \
                        (best is None or len(v) > len(obj[best])):
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


def read_records(path: str, *, trust_pickle: bool = False) -> tuple[Any, Any] | None:
    """A zip archive read as records (``torchzip``), or None: not a zip, or holding what only
    ``torch.load`` takes (after its pickle was vetted). A file the reader refuses stays refused,
    in its words: no other parser gets a second try at it. With ``trust_pickle`` the user has
    vouched for the file, and anything refused here goes to ``torch.load(weights_only=False)``."""
    try:
        with open(path, "rb", buffering=0) as fh:
            if _kind_of(fh.read(8)) != "zip":
                return None
    except OSError:
        return None
    try:
        return read_archive(path)
    except TargetError:
        if trust_pickle:
            return None
        raise


def load_torch_file(path: str, *, key: str | None = None, trust_pickle: bool = False,
                    format_name: str = "torch.save", whole: bool = False) -> Subject:
    """A ``torch.save`` file: its records read by ``torchzip`` and tensors made on access, or, with
    ``whole`` (or where the records reader leaves the file to torch), the object ``torch.load`` makes
    (weights only, memory-mapped), kept as the subject's ``checkpoint`` for a writer that saves it again."""
    records = None if whole else read_records(path, trust_pickle=trust_pickle)
    if records is not None:
        obj, archive = records
        notes: list[str] = []
    else:
        obj, notes = torch_load(path, trust_pickle=trust_pickle)
    if trust_pickle:
        notes.append("loaded with --trust-pickle: the file's pickled objects were allowed to run code")
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, Mapping) and key is None:
        mods = [k for k, v in obj.items() if isinstance(v, nn.Module)]
        if len(mods) == 1:
            module, key = obj[mods[0]], str(mods[0])
    if module is not None:
        return Subject(tensors=module_tensors(module), module=module,
                       source=Source(target=path, format=f"{format_name} (pickled nn.Module)", key=key, notes=notes))
    tensors, used, more = pick_state(obj, key, path)
    fmt = format_name + (" training checkpoint" if used else " state dict")
    decls, pairs = megatron_declarations(obj, set(tensors), os.path.basename(path))
    if records is not None:
        tensors = archive.tensors(tensors)
        spans = tensors.spans()
    else:
        spans = file_spans(tensors, path)
    return Subject(tensors=tensors, source=Source(target=path, format=fmt, key=used, notes=notes + more),
                   file_spans=spans, declarations=decls, declared_pairs=pairs,
                   checkpoint=None if records is not None else obj)
