"""Loaders: turn a target (path, spec, bundled name, module or state dict) into a Subject.

One small module per family; each returns the same ``Subject`` so nothing downstream knows
where the tensors came from. Formats are recognised by content, not by file extension.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
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


def from_module(module, target: str | None = None, fmt: str = "nn.Module", notes=None, config=None) -> Subject:
    sub = Subject(tensors=module_tensors(module), module=module, config=config,
                  source=Source(target=target or type(module).__name__, format=fmt, notes=list(notes or [])))
    sub.loader_findings += wrapped_findings(module)  # FSDP2 units read from their records, never gathered
    return sub


def from_mapping(obj: Mapping, key: str | None = None, target: str = "<state dict>") -> Subject:
    from tiecheck.loaders.formats.torchfile import pick_state  # noqa: PLC0415 - a loader that needs torch

    tensors, used, notes = pick_state(obj, key, target)
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
    from tiecheck.loaders.formats.hf import read_config  # noqa: PLC0415 - a loader that needs torch

    try:
        cfg = read_config(folder)
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
        from tiecheck.loaders.formats import torchfile  # noqa: PLC0415 - a loader that needs torch

        return torchfile.load_torch_file(target, key=key, trust_pickle=trust_pickle, whole=whole)
    if kind == detect.SAFETENSORS:
        from tiecheck.loaders.formats.safetensors_files import load_safetensors_file  # noqa: PLC0415 - a loader that needs torch

        return load_safetensors_file(path)
    if kind == detect.WEIGHTS_INDEX:
        from tiecheck.loaders.formats.sharded import load_sharded  # noqa: PLC0415 - a loader that needs torch

        return load_sharded(path, detect.read_weights_index(path), trust_pickle=trust_pickle, progress=progress)
    if kind == detect.PT2:
        from tiecheck.loaders.formats.export import load_pt2  # noqa: PLC0415 - a loader that needs torch

        return load_pt2(path, trust_pickle=trust_pickle)
    if kind == detect.TORCHSCRIPT:
        from tiecheck.loaders.formats.torchscript import load_torchscript  # noqa: PLC0415 - a loader that needs torch

        return load_torchscript(path, trust_pickle=trust_pickle)
    if kind == detect.ONNX:
        try:
            from tiecheck.loaders.formats.onnx_files import load_onnx  # noqa: PLC0415 - onnx is the [onnx] extra
        except ImportError as e:
            raise TargetError(f"{target}: an ONNX model; reading it needs the onnx package: "
                              f"pip install 'tiecheck[onnx]'") from e
        return load_onnx(path)
    if kind == detect.GGUF:
        try:
            from tiecheck.loaders.formats.gguf_files import load_gguf  # noqa: PLC0415 - gguf is the [gguf] extra
        except ImportError as e:
            raise TargetError(f"{target}: a GGUF file; reading it needs the gguf package: "
                              f"pip install 'tiecheck[gguf]'") from e
        return load_gguf(path)
    raise TargetError(f"{target}: not a recognised checkpoint; the first bytes match no known format (torch.save, "
                      f"safetensors, a *.index.json weights index, torch.export .pt2, TorchScript, ONNX, GGUF)")


def load_folder(path: Path, *, key: str | None = None, trust_pickle: bool = False,
                trust_remote_code: bool = False, progress: Callable[[int, int], None] | None = None) -> Subject:
    """A folder: a DCP checkpoint, a Hugging Face model folder, a sharded checkpoint or one weight file."""
    try:
        if detect.is_dcp_folder(path):
            # torch.distributed.checkpoint takes a second to import: only DCP folders pay for it
            from tiecheck.loaders.formats.dcp import load_dcp  # noqa: PLC0415

            return load_dcp(path, key=key)
        if detect.is_peft_folder(path):
            from tiecheck.loaders.formats.peft_adapter import load_adapter  # noqa: PLC0415 - a loader that needs torch (and peft)

            return load_adapter(path)
        if detect.is_hf_folder(path):
            from tiecheck.loaders.formats.hf import load_hf_folder  # noqa: PLC0415 - a loader that needs torch

            return load_hf_folder(path, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
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
    try:
        from torch import nn  # noqa: PLC0415 - only a module target needs torch here

        if isinstance(target, nn.Module):
            return from_module(target)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
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
        from tiecheck.loaders.remote import load_remote  # noqa: PLC0415 - huggingface_hub and fsspec, only for URLs

        return load_remote(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                           progress=progress)
    if spec.looks_like_spec(target):
        module = spec.load_module_spec(target)
        return from_module(module, target=target, fmt="python spec")
    if bundled.is_bundled(target):
        return bundled.load_bundled(target)
    # -- a Hugging Face Hub id (org/name[@revision]): the local cache first, else the Hub ------------
    if "/" in target:
        from tiecheck.loaders import remote  # noqa: PLC0415 - huggingface_hub, only for what may be a Hub id

        if remote.hub_id(target) is not None:
            return remote.load_remote(target, key=key, trust_pickle=trust_pickle,
                                      trust_remote_code=trust_remote_code, progress=progress)
    hint = ""
    names = bundled.names()
    if names:
        hint = f"{did_you_mean(target, names)}; bundled models: {', '.join(names)}"
    raise TargetError(f"{target}: no such file or folder, bundled model or Python spec "
                      f"(file.py:factory or package.module:factory){hint}")
