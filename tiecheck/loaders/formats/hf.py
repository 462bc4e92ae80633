"""Hugging Face model folders: ``config.json`` plus weights (safetensors or ``pytorch_model*.bin``).

This is where ties get lost. safetensors cannot store aliased tensors, so ``save_pretrained``
drops every tied name but one and the architecture re-ties on load; when both names are
stored, transformers ties them only if the values are equal and otherwise warns and loads
them untied; and serving engines that trust ``tie_word_embeddings`` over the files have served
gibberish. So the files are held against the architecture:
* With transformers (``pip install tiecheck[hf]``) the architecture is built from the config
  on the meta device (no weights allocated, nothing downloaded, no ``trust_remote_code``
  unless asked) and its ties are read from the built module itself: Parameter identity in
  ``state_dict(keep_vars=True)``. ``_tied_weights_keys`` alone is not enough: an untied Llama
  still lists ``lm_head.weight`` there, and BART lists one pair of a four-way group.
  ``torch.device("meta")`` keeps ties (accelerate's ``init_empty_weights`` re-wraps
  Parameters and can lose them); ``tie_weights()`` runs after building all the same.
* A tied name absent from the files is expected (TC012, info) and is re-tied in the subject,
  so the report shows the model as it will be loaded. Tied names stored twice with equal
  content are re-tied too (the copy is only wasted bytes); with different content they stay
  separate and raise TC010. The config's ``tie_word_embeddings`` is checked against the
  architecture and the files (TC011).
* Without transformers the files are analysed alone, the config-against-files check still
  runs, and the report says that architecture ties need the extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiecheck.errors import TargetError
from tiecheck.facts import Source, TensorFact, is_embedding, is_output_projection
from tiecheck.loaders.declared import (
    embedding_names,
    flat_config_pairs,
    merge_pairs,
    model_declarations,
)
from tiecheck.loaders.detect import (
    HF_CONFIG,
    SAFETENSORS,
    TORCH_SAVE,
    TORCH_SAVE_LEGACY,
    WEIGHTS_INDEX,
    read_weights_index,
    sniff_file,
)
from tiecheck.loaders.formats.safetensors_files import load_safetensors_file
from tiecheck.loaders.formats.sharded import load_sharded
from tiecheck.loaders.formats.torchfile import load_torch_file
from tiecheck.loaders.hf_architecture import Architecture, build_architecture
from tiecheck.loaders.hf_reconcile import LM_ARCH, KeyMap, architecture_ties, config_vs_files, key_map, reconcile
from tiecheck.loaders.names import check_names
from tiecheck.loaders.safejson import parse_json
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import tensor_facts

CONFIG = HF_CONFIG
CONFIG_LIMIT = 16 << 20  # configs are kilobytes; never read a huge file as one
# transformers' own order of preference when a folder holds several weight formats.
PREFERRED = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
             "pytorch_model.bin")


def read_config(path: Path) -> dict[str, Any]:
    p = path / CONFIG
    try:
        with open(p, "rb") as fh:
            # Read what the file holds, up to the limit (asking for the limit would allocate it).
            raw = fh.read(min(os.fstat(fh.fileno()).st_size, CONFIG_LIMIT) + 1)
        if len(raw) > CONFIG_LIMIT:
            raise TargetError(f"{p}: larger than {CONFIG_LIMIT:,} bytes; a model config is a few kilobytes, so this "
                              f"is not one")
        obj = parse_json(raw)
    except ValueError as e:
        raise TargetError(f"{p}: not valid JSON ({e}); fix or replace the config") from e
    except OSError as e:
        raise TargetError(f"{p}: cannot read ({e.strerror or e})") from e
    if not isinstance(obj, dict):
        raise TargetError(f"{p}: holds a JSON {type(obj).__name__}, not an object")
    return obj


def find_weights(path: Path) -> tuple[str, Path, list[str]]:
    """(kind, file, notes): the weights transformers would load from this folder."""

    notes: list[str] = []
    present = [name for name in PREFERRED if (path / name).is_file()]
    if present:
        chosen = path / present[0]
        others = [n for n in present if ("safetensors" in n) != ("safetensors" in present[0])]
        if others:
            notes.append(f"also holds {', '.join(others)}; read {present[0]}, as transformers does")
    else:
        kinds: dict[str, list[Path]] = {}
        for p in sorted(path.iterdir()):
            if p.is_file() and p.name != CONFIG and p.stat().st_size > 0:
                try:
                    kinds.setdefault(sniff_file(p) or "", []).append(p)
                except OSError:
                    continue
        for kind in (WEIGHTS_INDEX, SAFETENSORS, TORCH_SAVE, TORCH_SAVE_LEGACY):
            found = kinds.get(kind, [])
            if len(found) == 1:
                chosen = found[0]
                break
            if len(found) > 1 and kind != WEIGHTS_INDEX:
                raise TargetError(f"{path}: holds {CONFIG} and several {kind} files without an index "
                                  f"({', '.join(p.name for p in found[:4])}); name one of them")
        else:
            raise TargetError(f"{path}: holds {CONFIG} but no weights (looked for {', '.join(PREFERRED)} and any "
                              f"safetensors or torch.save file); is the download complete?")
    kind = sniff_file(chosen)
    if kind is None:
        raise TargetError(f"{chosen}: not a recognised weights file (neither safetensors, torch.save nor an index)")
    return kind, chosen, notes


def check_file_names(files: Subject, weights: Path) -> None:
    """Tensor names bounded before any regular expression (transformers' key renaming) sees them."""
    check_names(files.tensors, str(weights))


# -- declarations -----------------------------------------------------------------------------

def folder_declarations(files: Subject, facts: list[TensorFact], cfg: dict, arch: Architecture | None,
                        keys: KeyMap | None) -> tuple[list[dict], list[dict], dict[str, Any], list[str]]:
    """(declarations, declared pairs, stored copies, notes) of a folder, in the architecture's names.

    ``facts`` are the files' (``tensor_facts(files.tensors)``); ``keys`` is
    ``key_map(list(files.tensors), arch)``, None without an architecture.
    """
    mapping = keys.to_arch if keys is not None else {}
    rename = lambda n: mapping.get(n, n)  # noqa: E731 - file key -> architecture key
    copies = {rename(f.name): f.identity for f in facts}
    decls = list(files.declarations)
    pairs = [{**p, "names": [rename(n) for n in p["names"]]} for p in files.declared_pairs]
    if arch is not None:
        inp, out = embedding_names(arch.module)
        more_decls, more_pairs, notes = model_declarations(arch.module, cfg, input_name=inp, output_name=out,
                                                           expanded=arch.declared if arch.mapping_known else None)
    else:
        embeds = [f.name for f in facts if is_embedding(f)]
        heads = [f.name for f in facts if is_output_projection(f) and not is_embedding(f)]
        if not heads and embeds and any(LM_ARCH.search(str(a)) for a in cfg.get("architectures") or []):
            heads = ["lm_head.weight"]  # the name transformers' LM heads load from
        more_decls, more_pairs, notes = flat_config_pairs(cfg, embeds, heads)
    return decls + more_decls, merge_pairs(pairs + more_pairs), copies, notes


# -- the loader --------------------------------------------------------------------------------

def _load_weights(kind: str, path: Path, *, key: str | None, trust_pickle: bool,
                  progress: Callable[[int, int], None] | None = None) -> Subject:
    if kind == WEIGHTS_INDEX:
        return load_sharded(path, read_weights_index(path), trust_pickle=trust_pickle, restore_aliases=False,
                            progress=progress)
    if kind == SAFETENSORS:
        return load_safetensors_file(path, restore_aliases=False)  # the architecture re-ties
    return load_torch_file(str(path), key=key, trust_pickle=trust_pickle)


def load_hf_folder(path: Path, *, key: str | None = None, trust_pickle: bool = False,
                   trust_remote_code: bool = False, progress: Callable[[int, int], None] | None = None) -> Subject:
    cfg = read_config(path)
    kind, weights, notes = find_weights(path)
    files = _load_weights(kind, weights, key=key, trust_pickle=trust_pickle, progress=progress)
    check_file_names(files, weights)
    notes = [f"weights: {weights.name} ({files.source.format})", *notes, *files.source.notes]
    arch, arch_notes = build_architecture(path, cfg, trust_remote_code=trust_remote_code, stored=len(files.tensors))
    notes += arch_notes
    extra: dict[str, Any] = {"files": files.extra.get("files", [])}
    keys = key_map(list(files.tensors), arch) if arch is not None else None
    file_facts = tensor_facts(files.tensors)  # once: the reconciliation and the declarations both read them
    if arch is None:
        findings = config_vs_files(files.tensors, cfg, files.file_spans, file_facts)
        tensors, spans = files.tensors, files.file_spans
        extra["architecture"] = None
    else:
        cfg_tie = arch.tie_word_embeddings
        tensors, findings, more, facts, spans = reconcile(files.tensors, arch, cfg_tie, files.file_spans, keys,
                                                          file_facts)
        notes.insert(1, f"architecture {arch.name} built from {CONFIG} on the meta device with transformers "
                        f"{arch.version}: {architecture_ties(arch.groups)}")
        notes += more
        extra["architecture"] = {"class": arch.name, "transformers": arch.version,
                                 "ties": [list(g) for g in arch.groups],
                                 "declared": arch.declared, "tie_word_embeddings": cfg_tie,
                                 "input_embedding": arch.input_embedding, "output_embedding": arch.output_embedding,
                                 **facts}
    if arch is None and cfg.get("tie_word_embeddings") is not None:
        extra["config_tie_word_embeddings"] = cfg.get("tie_word_embeddings")
    decls, pairs, copies, more = folder_declarations(files, file_facts, cfg, arch, keys)
    notes += more
    # `files` is top-level, as for every other target (schema_version 2).
    return Subject(tensors=tensors, config=cfg, loader_findings=files.loader_findings + findings,
                   extra={"files": extra.pop("files"), "hf": extra}, file_spans=spans, declarations=decls,
                   declared_pairs=pairs, stored_copies=copies,
                   architecture=arch.module if arch is not None else None,
                   source=Source(target=str(path), format=f"Hugging Face folder ({files.source.format})",
                                 key=files.source.key, notes=notes))
