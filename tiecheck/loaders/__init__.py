"""Loaders: turn a target (path, spec, bundled name, module or state dict) into a Subject.

One small module per family; each returns the same ``Subject`` so nothing downstream knows
where the tensors came from. Formats are recognised by content, not by file extension.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from tiecheck.errors import TargetError, did_you_mean
from tiecheck.facts import Source
from tiecheck.loaders import detect
from tiecheck.loaders.formats import bundled, spec
from tiecheck.loaders.fsdp import wrapped_findings
from tiecheck.loaders.names import check_names
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import module_tensors

# URLs read by range (loaders/remote.py); the scheme alone decides, so nothing is imported for a path.
REMOTE_SCHEMES = ("https://", "http://", "s3://", "s3a://", "gs://", "gcs://", "hf://")


@dataclass(frozen=True)
class Reader:
    """Where a format's reader lives, and the extra its library comes in (``None``: a dependency)."""

    module: str
    function: str
    extra: str | None = None
    what: str = ""  # the format in words, for the install hint


# One line per reader, by the kind ``detect`` gives a file or folder. A new format is a line here and
# a branch in load_file/load_folder for its arguments.
READERS = {
    detect.TORCH_SAVE: Reader("tiecheck.loaders.formats.torchfile", "load_torch_file"),
    detect.SAFETENSORS: Reader("tiecheck.loaders.formats.safetensors_files", "load_safetensors_file"),
    detect.WEIGHTS_INDEX: Reader("tiecheck.loaders.formats.sharded", "load_sharded"),
    detect.PT2: Reader("tiecheck.loaders.formats.export", "load_pt2"),
    detect.TORCHSCRIPT: Reader("tiecheck.loaders.formats.torchscript", "load_torchscript"),
    detect.ONNX: Reader("tiecheck.loaders.formats.onnx_files", "load_onnx", "onnx", "an ONNX model"),
    detect.GGUF: Reader("tiecheck.loaders.formats.gguf_files", "load_gguf", "gguf", "a GGUF file"),
    "dcp": Reader("tiecheck.loaders.formats.dcp", "load_dcp"),
    "peft": Reader("tiecheck.loaders.formats.peft_adapter", "load_adapter"),
    "hf": Reader("tiecheck.loaders.formats.hf", "load_hf_folder"),
    "hf-config": Reader("tiecheck.loaders.formats.hf", "read_config"),
    "state dict": Reader("tiecheck.loaders.formats.torchfile", "pick_state"),
    "remote": Reader("tiecheck.loaders.remote", "load_remote", "remote", "a Hub id or URL"),
    "hub id": Reader("tiecheck.loaders.remote", "hub_id", "remote", "a Hub id"),
}


def reader(kind: str, target: str = "") -> Callable[..., Any]:
    """The reader of ``kind``, imported on first use.

    Why lazily: each reader imports torch or its format's library (onnx, gguf, peft, huggingface_hub;
    ``torch.distributed.checkpoint`` alone takes a second), and a bundled model, a spec or
    ``tiecheck --help`` must not pay for all of them. A reader whose extra is missing is refused in
    one line that names the extra.

    Args:
        kind: a key of ``READERS``.
        target: what is being read, for the error.

    Returns:
        The reader function.
    """
    r = READERS[kind]
    try:
        module = import_module(r.module)
    except ImportError as e:
        if r.extra is None:
            raise
        raise TargetError(f"{target}: {r.what}; reading it needs the {r.extra} package: "
                          f"pip install 'tiecheck[{r.extra}]'") from e
    return getattr(module, r.function)


def from_module(module, target: str | None = None, fmt: str = "nn.Module", notes=None, config=None) -> Subject:
    sub = Subject(tensors=module_tensors(module), module=module, config=config,
                  source=Source(target=target or type(module).__name__, format=fmt, notes=list(notes or [])))
    sub.loader_findings += wrapped_findings(module)  # FSDP2 units read from their records, never gathered
    return sub


def from_mapping(obj: Mapping, key: str | None = None, target: str = "<state dict>") -> Subject:
    tensors, used, notes = reader("state dict")(obj, key, target)
    fmt = "training checkpoint" if used else "state dict"
    return Subject(tensors=tensors, source=Source(target=target, format=fmt, key=used, notes=notes))


def load_path(path: Path, *, key: str | None = None, trust_pickle: bool = False,
              trust_remote_code: bool = False, progress: Callable[[int, int], None] | None = None,
              whole: bool = False) -> Subject:
    """A file or folder, read by content. Warnings raised while reading it (torch's, about an old
    pickle protocol or an experimental dtype the file declares) become notes of the report, so
    the file's bytes cannot add lines to the output. ``progress(done, total)`` is called as the
    shards of a weights index are read. ``whole``: a torch.save file is read with torch.load and its
    object kept (``Subject.checkpoint``), for a writer that saves it again."""

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = _load_path(path, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                         progress=progress, whole=whole)
    check_names(sub.tensors, str(path))
    seen: list[str] = []
    for w in caught:
        text = (str(w.message).strip().splitlines() or [""])[0][:200]
        if text and text not in seen:
            seen.append(text)
    sub.source.notes.extend(f"warning while reading: {t}" for t in seen[:3])
    return sub


def _load_path(path: Path, *, key: str | None = None, trust_pickle: bool = False,
               trust_remote_code: bool = False, progress: Callable[[int, int], None] | None = None,
               whole: bool = False) -> Subject:
    target = str(path)
    if path.is_dir():
        return load_folder(path, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                           progress=progress)
    if not path.is_file():
        raise TargetError(f"{target}: not a regular file")
    try:
        size = path.stat().st_size
        kind = detect.sniff_file(path) if size else None
    except OSError as e:
        raise TargetError(f"{target}: cannot read ({e.strerror or e})") from e
    if size == 0:
        raise TargetError(f"{target}: the file is empty")
    sub = load_file(path, kind, key=key, trust_pickle=trust_pickle, progress=progress, whole=whole)
    note = hf_folder_note(path)
    if note:
        sub.source.notes.insert(0, note)
    return sub


def hf_folder_note(path: Path) -> str | None:
    """A note for a weights file inside a Hugging Face folder: the folder's config.json, which
    the file alone does not see, declares the architecture and its ties."""
    folder = path.parent
    if not detect.is_hf_folder(folder):
        return None
    try:
        cfg = reader("hf-config")(folder)
    except TargetError:
        return None  # a broken config is the folder's problem, reported when the folder is inspected
    where = f"{path.name} is part of the Hugging Face folder {folder}, whose config.json"
    if cfg.get("tie_word_embeddings", True) is not False:
        return (f"{where} declares tie_word_embeddings=true: ties the architecture makes on load are not in this "
                f"file; inspect the folder to check them: tiecheck inspect {folder}")
    return (f"{where} describes the architecture (model_type {cfg.get('model_type')}); inspect the folder to "
            f"check it against the files: tiecheck inspect {folder}")


def load_file(path: Path, kind: str | None, *, key: str | None = None, trust_pickle: bool = False,
              progress: Callable[[int, int], None] | None = None, whole: bool = False) -> Subject:
    """One file whose format ``detect.sniff_file`` recognised; ``progress(done, total)`` follows the
    shards of a weights index; ``whole`` as ``load_path`` says."""

    target = str(path)
    if kind in (detect.TORCH_SAVE, detect.TORCH_SAVE_LEGACY):
        return reader(detect.TORCH_SAVE)(target, key=key, trust_pickle=trust_pickle, whole=whole)
    if kind == detect.WEIGHTS_INDEX:
        return reader(kind)(path, detect.read_weights_index(path), trust_pickle=trust_pickle, progress=progress)
    if kind in (detect.PT2, detect.TORCHSCRIPT):
        return reader(kind)(path, trust_pickle=trust_pickle)
    if kind in (detect.SAFETENSORS, detect.ONNX, detect.GGUF):
        return reader(kind, target)(path)
    raise TargetError(f"{target}: not a recognised checkpoint; the first bytes match no known format (torch.save, "
                      f"safetensors, a *.index.json weights index, torch.export .pt2, TorchScript, ONNX, GGUF)")


def load_folder(path: Path, *, key: str | None = None, trust_pickle: bool = False,
                trust_remote_code: bool = False, progress: Callable[[int, int], None] | None = None) -> Subject:
    """A folder: a DCP checkpoint, a Hugging Face model folder, a sharded checkpoint or one weight file."""
    try:
        if detect.is_dcp_folder(path):
            return reader("dcp")(path, key=key)
        if detect.is_peft_folder(path):
            return reader("peft")(path)
        if detect.is_hf_folder(path):
            return reader("hf")(path, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                                progress=progress)
        kinds: dict[str | None, list[Path]] = {}
        for p in sorted(path.iterdir()):
            if p.is_file() and p.stat().st_size > 0:
                kinds.setdefault(detect.sniff_file(p), []).append(p)
    except OSError as e:
        raise TargetError(f"{path}: cannot read the folder ({e.strerror or e})") from e
    indexes = kinds.pop(detect.WEIGHTS_INDEX, [])
    kinds.pop(None, None)
    if len(indexes) == 1:
        sub = load_file(indexes[0], detect.WEIGHTS_INDEX, key=key, trust_pickle=trust_pickle, progress=progress)
        sub.source.notes.insert(0, f"read {indexes[0].name} from the folder")
        return sub
    if len(indexes) > 1:
        raise TargetError(f"{path}: the folder holds several weight indexes ({', '.join(p.name for p in indexes)}); "
                          f"name one of them")
    weights = [p for ps in kinds.values() for p in ps]
    if not weights:
        raise TargetError(f"{path}: the folder holds no weight files (looked for torch.save, safetensors, "
                          f"torch.export and TorchScript files, a *.index.json, a config.json, a DCP .metadata)")
    if len(weights) > 1:
        names = ", ".join(p.name for p in sorted(weights)[:6])
        raise TargetError(f"{path}: the folder holds several weight files ({names}) and no index; name one of them")
    kind = next(k for k, ps in kinds.items() if ps)
    sub = load_file(weights[0], kind, key=key, trust_pickle=trust_pickle)
    sub.source.notes.insert(0, f"read {weights[0].name} from the folder")
    return sub


def load_target(target: Any, *, key: str | None = None, trust_pickle: bool = False,
                trust_remote_code: bool = False, progress: Callable[[int, int], None] | None = None) -> Subject:
    """Whatever the user pointed at, as a Subject; ``progress(done, total)`` is called as the shards
    of a weights index are read. Raises TiecheckError for bad input."""

    if isinstance(target, Subject):
        return target
    # An nn.Module exists only once torch is imported: asking sys.modules keeps a path or a name
    # from importing torch here.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(target, torch.nn.Module):
        return from_module(target)
    if isinstance(target, Mapping):
        return from_mapping(target, key=key)
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if not isinstance(target, str):
        raise TargetError(f"cannot analyse a {type(target).__name__}: pass an nn.Module, a state dict, a path, "
                          f"a bundled model name or a 'file.py:factory' spec")
    if not target.strip():
        raise TargetError("empty target: pass a path, a bundled model name or a 'file.py:factory' spec")
    # A path that exists wins over a name or a spec.
    if os.path.exists(target) or os.path.islink(target):
        return load_path(Path(target), key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                         progress=progress)
    # -- remote targets (loaders/remote.py): a URL before a spec, since a URL holds a colon ------------
    if target.lower().startswith(REMOTE_SCHEMES):
        return reader("remote", target)(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                           progress=progress)
    if spec.looks_like_spec(target):
        module = spec.load_module_spec(target)
        return from_module(module, target=target, fmt="python spec")
    if bundled.is_bundled(target):
        return bundled.load_bundled(target)
    # -- a Hugging Face Hub id (org/name[@revision]): the local cache first, else the Hub ------------
    if "/" in target and reader("hub id", target)(target) is not None:
        return reader("remote", target)(target, key=key, trust_pickle=trust_pickle,
                                        trust_remote_code=trust_remote_code, progress=progress)
    hint = ""
    names = bundled.names()
    if names:
        hint = f"{did_you_mean(target, names)}; bundled models: {', '.join(names)}"
    raise TargetError(f"{target}: no such file or folder, bundled model or Python spec "
                      f"(file.py:factory or package.module:factory){hint}")
