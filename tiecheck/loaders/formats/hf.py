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

import contextlib
import dataclasses
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules import module as torch_module

from tiecheck.errors import TargetError
from tiecheck.facts import Source, TensorFact, is_embedding, is_output_projection
from tiecheck.findings import Finding, finding
from tiecheck.loaders.content import TorchContentReader, tensor_layout
from tiecheck.loaders.declared import (
    embedding_names,
    flag_reaches,
    flat_config_pairs,
    governing_config,
    head_source,
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
from tiecheck.loaders.formats.safetensors_files import load_safetensors_file, load_sharded
from tiecheck.loaders.formats.torchfile import load_torch_file
from tiecheck.loaders.metainit import skip_init_on_meta
from tiecheck.loaders.names import check_names
from tiecheck.loaders.safejson import parse_json
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import fact_of, tensor_facts

CONFIG = HF_CONFIG
CONFIG_LIMIT = 16 << 20  # configs are kilobytes; never read a huge file as one
# transformers' own order of preference when a folder holds several weight formats.
PREFERRED = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
             "pytorch_model.bin")
NEEDS_EXTRA = ("architecture ties need transformers: pip install tiecheck[hf]; analysed the files alone "
               "(ties the architecture re-creates on load are not shown)")
_LM_ARCH = re.compile(r"(ForCausalLM|LMHeadModel|ForMaskedLM|ForConditionalGeneration|MTModel|WithLMHead)$")


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


# -- what the folder's files may name -------------------------------------------------------------

def architecture_class(transformers, name: object) -> type | None:
    """The transformers model class that ``config.json``'s ``architectures`` entry ``name`` names, or None.

    Only a ``PreTrainedModel`` subclass is a model: ``"architectures": ["Trainer"]`` would otherwise
    make tiecheck call ``transformers.Trainer(config)``. The name must be a plain identifier.
    """
    if not isinstance(name, str) or not re.fullmatch(r"\w{1,200}", name):
        return None
    cls = getattr(transformers, name, None)
    base = getattr(transformers, "PreTrainedModel", None)
    if isinstance(cls, type) and base is not None and issubclass(cls, base):
        return cls
    return None


def check_file_names(files: Subject, weights: Path) -> None:
    """Tensor names bounded before any regular expression (transformers' key renaming) sees them."""
    check_names(files.tensors, str(weights))


# -- the architecture -----------------------------------------------------------------------

@dataclass
class Architecture:
    name: str
    keys: list[str]  # state_dict order
    groups: list[tuple[str, ...]]  # names sharing one Parameter / buffer, each sorted
    declared: dict[str, str]  # transformers' expanded tie mapping, target -> source
    prefix: str
    tie_word_embeddings: bool | None
    input_embedding: str | None
    output_embedding: str | None
    version: str
    notes: list[str] = field(default_factory=list)
    module: Any = None  # the meta-device module itself (for FLOPs)
    # ``declared`` is transformers' own expansion (5.x); False where it could not be had (4.x)
    mapping_known: bool = False

    def group_of(self, name: str) -> tuple[str, ...] | None:
        for g in self.groups:
            if name in g:
                return g
        return None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs config and generation warnings that are noise for an inspection."""

    from transformers.utils import logging as tlog  # noqa: PLC0415 - transformers is the `hf` extra

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(level)


def _model_class(transformers, folder: Path, config, cfg: dict, trust_remote_code: bool):
    for name in cfg.get("architectures") or []:
        cls = architecture_class(transformers, name)
        if cls is not None:
            return cls
    auto_map = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else {}
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModel"):
        if auto in auto_map and trust_remote_code:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: PLC0415 - transformers is the `hf` extra

            ref = auto_map[auto]
            ref = ref[0] if isinstance(ref, (list, tuple)) else ref
            return get_class_from_dynamic_module(ref, str(folder), local_files_only=True)
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModel"):
        mapping = getattr(getattr(transformers, auto, None), "_model_mapping", None)
        try:
            if mapping is not None and type(config) in mapping:
                return mapping[type(config)]
        except (KeyError, ValueError):
            continue
    return None


class ArchitectureTooLarge(Exception):
    """The config describes far more modules or tensors than the folder's files hold."""


def tensor_budget(stored: int) -> int:
    """How many tensors (and modules) an architecture may register while it is built for files
    holding ``stored`` tensors: a generous multiple (non-persistent buffers, tied names dropped
    from the files, modules without weights), never less than a small model needs."""
    return 8 * stored + 4096


@contextlib.contextmanager
def registration_budget(limit: int, stored: int):
    """Abort building a module once it registers more than ``limit`` parameters, buffers or submodules.

    The config is read from an untrusted folder: ``num_hidden_layers: 1000000`` would build a
    million layers (minutes and gigabytes, even on the meta device). Real architectures register
    about as many tensors as their files hold, so the build stops far above that instead.
    """


    counts = {"tensors": 0, "modules": 0}
    builder = threading.get_ident()  # the hooks are global: modules built by other threads do not count

    def count(kind: str):
        def hook(*_args):
            if threading.get_ident() != builder:
                return
            counts[kind] += 1
            if counts[kind] > limit:
                raise ArchitectureTooLarge(f"config.json describes more than {limit:,} {kind}, the files hold "
                                           f"{stored:,} tensors")
        return hook

    handles = [torch_module.register_module_parameter_registration_hook(count("tensors")),
               torch_module.register_module_buffer_registration_hook(count("tensors")),
               torch_module.register_module_module_registration_hook(count("modules"))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build_architecture(folder: Path, cfg: dict, *, trust_remote_code: bool = False,
                       stored: int | None = None) -> tuple[Any, list[str]]:
    """(Architecture or None, notes). Never raises for an architecture it cannot build: it says why.

    ``stored`` is the number of tensors the folder's files hold; the build is aborted when the
    config describes many times more (see ``registration_budget``).
    """
    try:
        import transformers  # noqa: PLC0415 - transformers is the `hf` extra
    except ImportError:
        return None, [NEEDS_EXTRA]

    archs = [str(a) for a in cfg.get("architectures") or []]
    custom = bool(cfg.get("auto_map")) and not any(architecture_class(transformers, a) is not None for a in archs)
    if custom and not trust_remote_code:
        return None, [f"the architecture ({', '.join(archs or ['auto_map'])}) is custom "
                      f"code shipped in the folder; it was not run. Rerun with --trust-remote-code to build it and "
                      f"check its ties (that runs the folder's Python files); analysed the files alone"]
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                             local_files_only=True)
            cls = _model_class(transformers, folder, config, cfg, trust_remote_code)
            if cls is None:
                return None, [f"transformers {transformers.__version__} has no model class for this config "
                              f"(model_type {cfg.get('model_type')!r}); analysed the files alone"]

            # Initialisers on meta tensors cost seconds (they import torch._dynamo) and do nothing.
            budget = contextlib.nullcontext() if stored is None else registration_budget(tensor_budget(stored), stored)
            with torch.device("meta"), skip_init_on_meta(), budget:
                model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
    except ArchitectureTooLarge as e:
        return None, [f"the architecture was not built: {e}, so config.json does not describe these files; "
                      f"analysed the files alone"]
    except Exception as e:  # noqa: BLE001 - any failure to build leaves the file analysis intact
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        hint = " (rerun with --trust-remote-code if you trust the folder's code)" if "trust_remote_code" in msg else ""
        return None, [f"could not build the architecture from {CONFIG} with transformers "
                      f"{transformers.__version__} ({type(e).__name__}: {msg}){hint}; analysed the files alone"]
    return _describe(model, type(model).__name__, transformers.__version__), []


def _describe(model, name: str, version: str) -> Architecture:
    sd = model.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = {}
    for k, v in sd.items():
        by_id.setdefault(id(v), []).append(k)
    groups = [tuple(sorted(v)) for v in by_id.values() if len(v) > 1]
    declared, mapping_known = {}, False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        with contextlib.suppress(Exception):
            declared = dict(model.get_expanded_tied_weights_keys(all_submodels=True))
            mapping_known = True
    name_of = {id(v): k for k, v in reversed(list(sd.items()))}
    # The module's own name first: a tied head's weight is also the embedding's, whose name comes first.
    module_name: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        module_name.setdefault(id(m), n)  # a shared module (transformers 4's T5 embedding) by its first path

    def weight_name(getter: str) -> str | None:
        try:
            mod = getattr(model, getter)()
        except Exception:  # noqa: BLE001 - many models raise NotImplementedError here
            return None
        w = getattr(mod, "weight", None)
        own = f"{module_name[id(mod)]}.weight" if id(mod) in module_name else None
        if own is not None and own in sd:
            return own
        return name_of.get(id(w)) if w is not None else None

    head = weight_name("get_output_embeddings")
    # The flag of the sub-model the head belongs to (an encoder-decoder's decoder), as transformers reads it.
    config, _ = governing_config(model, head)
    tie = getattr(config, "tie_word_embeddings", None)
    return Architecture(name=name, keys=list(sd), groups=sorted(groups), declared=declared, module=model,
                        mapping_known=mapping_known,
                        prefix=getattr(model, "base_model_prefix", "") or "",
                        tie_word_embeddings=tie if isinstance(tie, bool) else None,
                        # The embedding the head ties to, where the model's tie mapping names it (Marian with
                        # separate vocabularies: the decoder's, not get_input_embeddings(), the encoder's).
                        input_embedding=head_source(model, head) or weight_name("get_input_embeddings"),
                        output_embedding=head, version=version)


# -- files against architecture ---------------------------------------------------------------

def match_keys(file_keys: list[str], arch_keys: list[str], prefix: str) -> tuple[dict[str, str], str]:
    """file key -> architecture key, allowing for a base-model prefix added or dropped on save: transformers
    4's rule (one decision for the whole checkpoint), used where transformers has no per-key mapping."""
    arch = set(arch_keys)
    options = [("", lambda k: k)]
    if prefix:
        p = prefix + "."
        options.append((f"added prefix '{p}'", lambda k: k if k.startswith(p) else p + k))
        options.append((f"removed prefix '{p}'", lambda k: k[len(p):] if k.startswith(p) else k))
    best, best_how, best_n = {}, "", -1
    for how, fn in options:
        m = {k: fn(k) for k in file_keys if fn(k) in arch}
        if len(m) > best_n:
            best, best_how, best_n = m, how, len(m)
    return _one_to_one(best), best_how


def _one_to_one(mapping: dict[str, str]) -> dict[str, str]:
    """``mapping`` without the keys that land on an architecture key another file key took first."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for k, v in mapping.items():
        if v not in taken:
            out[k] = v
            taken.add(v)
    return out


def load_time_keys(keys: list[str], arch: Architecture) -> tuple[dict[str, str], dict[str, tuple[str, ...]]] | None:
    """Where ``from_pretrained`` sends each file key, asked of transformers' own key mapping.

    transformers 5 maps every checkpoint key while it loads (``core_model_loading``): legacy names
    renamed one to one, checkpoint conversion mappings applied (Qwen2-VL's ``model.`` ->
    ``model.language_model.``), the base-model prefix added or dropped key by key, and a
    mixture-of-experts layer saved one tensor per expert fused into the one tensor its architecture
    holds. The loop below is ``convert_and_load_state_dict_in_model``'s, calling its
    ``rename_source_key`` with the mapping ``from_pretrained`` builds (``get_model_conversion_mapping``),
    so the answer is what this transformers does; a hand-written copy of its patterns would drift.

    Args:
        keys: the file keys.
        arch: the architecture, built on the meta device.

    Returns:
        ``(renamed, converted)``: ``renamed`` maps a key loaded one to one to its architecture key
        (a key that stays the same included); ``converted`` maps a key a converter merges with others,
        or splits, to the architecture keys it feeds. None where transformers has no such mapping (4.x) or there is no module.
    """
    if arch.module is None:
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: PLC0415 - transformers is the `hf` extra, 5.x only
        from transformers.core_model_loading import (  # noqa: PLC0415 - idem
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        return None
    try:
        transforms = get_model_conversion_mapping(arch.module)
    except Exception:  # noqa: BLE001 - a mapping this model cannot give: keys are matched as they are
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    known = dict.fromkeys(arch.keys, True)
    # from_pretrained passes the model's base_model_prefix as it is ("" included).
    prefix = getattr(arch.module, "base_model_prefix", arch.prefix)
    targets = {p: c.target_patterns for c in converters for p in c.source_patterns}
    renamed: dict[str, str] = {}
    converted: dict[str, tuple[str, ...]] = {}
    # In transformers' order: some renamings hold state from one key to the next (a guard pattern).
    for k in sorted(keys, key=dot_natural_key):
        new, pattern = rename_source_key(k, renamings, converters, prefix, known)
        if new not in known and k in known:
            new, pattern = rename_source_key(k, [], [], base_model_prefix=prefix, meta_state_dict=known)
        if new not in known:
            continue
        if pattern is None:
            renamed[k] = new
        else:
            # A one-to-many converter (a fused qkv split in three) fills every target: the key names its first.
            first, *others = targets[pattern]
            converted[k] = (new, *(t for t in (new.replace(first, o) for o in others) if t in known))
    return renamed, converted


def renaming_mapping_4x(keys: list[str], arch: Architecture) -> dict[str, str] | None:
    """Where transformers 4 (4.5x) sends each file key: its ``_load_pretrained_model``'s own steps.

    The base-model prefix is added or dropped for the whole checkpoint, as that loader decides it,
    and each key goes through the model's ``_get_key_renaming_mapping`` (legacy ``gamma``/``beta``
    names, and the class's ``_checkpoint_conversion_mapping`` for the vision-language models the
    loader applies it to: Qwen2-VL's ``model.`` -> ``model.language_model.``).

    Returns:
        file key -> architecture key for the keys that land on one; None where the model has no
        such method (transformers before 4.5x, or a module that is not a ``PreTrainedModel``).
    """
    model = arch.module
    rename = getattr(model, "_get_key_renaming_mapping", None)
    if rename is None:
        return None
    try:
        from transformers.modeling_utils import VLMS  # noqa: PLC0415 - transformers 4.x: the classes it maps keys for
    except ImportError:
        VLMS = ()
    key_mapping = None
    if any(n in c.__name__.lower() for c in type(model).__mro__[:-1] for n in VLMS):
        key_mapping = getattr(type(model), "_checkpoint_conversion_mapping", None) or None
    prefix = model.base_model_prefix
    has_prefix = bool(prefix) and any(k.startswith(prefix) for k in keys)
    expects_prefix = bool(prefix) and hasattr(model, prefix)
    try:
        mapping = rename(keys, key_mapping, has_prefix and not expects_prefix, expects_prefix and not has_prefix)
    except Exception:  # noqa: BLE001 - transformers raises on a state dict it calls corrupted: matched by name then
        return None
    known = set(arch.keys)
    return {k: v for k, v in sorted(mapping.items()) if v in known}


@dataclass
class KeyMap:
    """File keys against the architecture's: found once per folder, read by the reconciliation and
    by the declared layer."""

    to_arch: dict[str, str]  # file key -> architecture key, one to one
    notes: list[str]
    converted: dict[str, tuple[str, ...]]  # file key -> the architecture keys transformers builds from it (and others)
    # file key -> the architecture key it lands on after another file key that fills it: transformers loads
    # the first in its own order and says nothing of the second (neither missing nor unexpected)
    shadowed: dict[str, str] = field(default_factory=dict)


def key_map(file_keys: list[str], arch: Architecture) -> KeyMap:
    """The file keys matched to the architecture's as ``from_pretrained`` matches them (``load_time_keys``);
    with transformers 4, by name and a base-model prefix added or dropped for the whole checkpoint."""
    known = set(arch.keys)
    if all(k in known for k in file_keys):
        return KeyMap({k: k for k in file_keys}, [], {})  # every key is the architecture's: nothing to map
    found = load_time_keys(file_keys, arch)
    if found is None:
        renamed = renaming_mapping_4x(file_keys, arch)
        if renamed is None:
            mapping, how = match_keys(file_keys, arch.keys, arch.prefix)
            return KeyMap(mapping, [f"file keys matched to the architecture after {how}"] if how else [], {})
        found = renamed, {}
    renamed, converted = found
    mapping = _one_to_one(renamed)
    shadowed = {k: v for k, v in renamed.items() if k not in mapping}
    notes = _mapping_notes(mapping, arch.prefix)
    if shadowed:
        k, v = next(iter(shadowed.items()))
        notes.append(f"{len(shadowed)} file key{'s' if len(shadowed) != 1 else ''} land{'s' if len(shadowed) == 1 else ''} "
                     f"on an architecture key another file key fills first (e.g. {k} -> {v}, filled by "
                     f"{next(f for f, a in mapping.items() if a == v)}): transformers loads the first, in its own "
                     f"order, and drops the other without a word")
    return KeyMap(mapping, notes, converted, shadowed)


def _mapping_notes(mapping: dict[str, str], prefix: str) -> list[str]:
    """What the mapping did to the keys, as the report's notes: a prefix added or dropped, keys renamed."""
    p = f"{prefix}." if prefix else None
    added = [k for k, v in mapping.items() if p and v == p + k]
    removed = [k for k, v in mapping.items() if p and k == p + v]
    other = [(k, v) for k, v in mapping.items() if k != v and k not in set(added) | set(removed)]
    notes = []
    for keys, how in ((added, f"added prefix '{p}'"), (removed, f"removed prefix '{p}'")):
        if keys:
            notes.append(f"{len(keys)} file key{'s' if len(keys) != 1 else ''} matched to the architecture after {how}")
    if other:
        k, v = other[0]
        notes.append(f"{len(other)} file key{'s' if len(other) != 1 else ''} matched to the architecture after "
                     f"transformers' load-time renaming (e.g. {k} -> {v})")
    return notes


def _same_memory(a, b) -> bool:
    fa, fb = fact_of("a", a), fact_of("b", b)
    return fa.extent is not None and fa.identity == fb.identity


def _equal(a, b, spans=(None, None)) -> bool | None:
    """Bitwise equality of two stored tensors; None when there is no data to compare."""

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return None
    if _same_memory(a, b):
        return True
    known = {k: s for k, s in zip("ab", spans, strict=True) if s is not None}
    with TorchContentReader({"a": a, "b": b}, known) as reader:
        return reader.equal("a", "b")


def _plural(items, one: str, many: str) -> str:
    return one if len(items) == 1 else many


def reconcile(files: dict[str, Any], arch: Architecture, cfg_tie: bool | None, spans: dict[str, Any] | None = None,
              keys: KeyMap | None = None, file_facts: list[TensorFact] | None = None,
              ) -> tuple[dict, list[Finding], list[str], dict, dict]:
    """The model as the architecture loads it from these files: tensors, findings, notes, facts, spans.

    ``keys`` (``key_map(list(files), arch)``) and ``file_facts`` (``tensor_facts(files)``) are
    passed when the caller already has them.
    """
    spans = spans or {}
    keys = keys or key_map(list(files), arch)
    mapping, converted = keys.to_arch, keys.converted
    file_key = {v: k for k, v in mapping.items()}
    notes: list[str] = list(keys.notes)
    stored = RenamedTensors(files, file_key)  # architecture name -> the file's tensor, made when read
    unexpected = [k for k in files if k not in mapping and k not in converted and k not in keys.shadowed]
    pieces: dict[str, list[str]] = {}  # architecture key transformers builds on load -> the file keys merged into it
    for k, vs in converted.items():
        for v in vs:
            pieces.setdefault(v, []).append(k)
    findings: list[Finding] = []
    alias_of: dict[str, str] = {}
    redundant = 0
    absent_tied: list[tuple[str, ...]] = []
    for group in arch.groups:
        present = [n for n in group if n in stored]
        if not present:
            continue
        # Keep the name transformers ties to (the mapping's source) when it is stored.
        sources = {arch.declared.get(n) for n in group} - {None}
        # Without transformers 5's mapping, transformers 4 ties the output embedding to the input one.
        sources = sources or {arch.input_embedding}
        base = next((n for n in present if n in sources), present[0])
        differing = []
        for n in present:
            if n == base:
                continue
            if stored[n].dtype != stored[base].dtype:
                # Values in different formats (a quantized head beside the embedding) are not compared: the
                # packed-head check (TC022) and the declared layer say what they are.
                continue
            eq = _equal(stored[base], stored[n], (spans.get(file_key[base]), spans.get(file_key[n])))
            if eq is False:
                differing.append(n)
            else:
                if not _same_memory(stored[base], stored[n]):
                    redundant += stored[n].numel() * stored[n].element_size()
                alias_of[n] = base
        if differing:
            t_b = stored[base]
            shapes = "; ".join(f"{n} {list(stored[n].shape)} {str(stored[n].dtype).replace('torch.', '')}"
                               for n in [base, *differing])
            findings.append(finding(
                "TC010", f"{arch.name} ties {', '.join([base, *differing])}, but the files store "
                         f"{_plural(differing, 'both', 'each')} with different content ({shapes}): transformers "
                         f"warns and loads them untied, and engines that trust the tie use one copy for both",
                [base, *differing], shape=list(t_b.shape)))
        absent = [n for n in group if n not in stored]
        for n in absent:
            alias_of[n] = base
        if absent:
            absent_tied.append(group)
            findings.append(finding(
                "TC012", f"{', '.join(absent)} {_plural(absent, 'is', 'are')} absent from the files: {arch.name} "
                         f"ties {_plural(absent, 'it', 'them')} to {base}, which is stored", group))
    if redundant:
        notes.append(f"tied names stored twice with equal content: {redundant:,} redundant bytes in the files "
                     f"(transformers re-ties them on load)")

    names: dict[str, str] = {}  # architecture name -> the file key whose tensor it is
    out_spans: dict[str, Any] = {}
    missing = []
    for k in arch.keys:
        src = alias_of.get(k, k)
        if src in stored:
            names[k] = file_key[src]
            if file_key[src] in spans:
                out_spans[k] = spans[file_key[src]]
        elif k not in pieces:
            missing.append(k)
    # Tensors the architecture does not name keep their file names; so do the pieces a converter
    # merges: the analyses see what the files store.
    for k in [k for k in files if k in converted or k in keys.shadowed] + unexpected:
        if k in names:
            continue  # a shadowed key of the architecture's own name: the name is the tensor transformers loads
        names[k] = k
        if k in spans:
            out_spans[k] = spans[k]
    tensors = RenamedTensors(files, names, file_facts)

    head, emb = arch.output_embedding, arch.input_embedding
    arch_ties = bool(head and emb and arch.group_of(head) and emb in arch.group_of(head))
    # A class whose tie mapping names no tie for its head loads it as stored whatever the flag says.
    inert = bool(cfg_tie and head and arch.mapping_known and not flag_reaches(arch.declared, head))
    if cfg_tie is not None and head and emb and cfg_tie != arch_ties and not inert:
        findings.append(finding(
            "TC011", f"config.json says tie_word_embeddings={str(cfg_tie).lower()}, but {arch.name} "
                     f"{'does not tie' if cfg_tie else 'ties'} {head} to {emb}", [head, emb]))
    if head and emb and head in missing and emb in stored and not arch_ties:
        why = "config.json says tie_word_embeddings=false" if cfg_tie is False else f"{arch.name} does not tie it"
        findings.append(finding(
            "TC011", f"the files hold no {head} and {why}: transformers initialises the output projection "
                     f"randomly on load (the model will produce gibberish); if the head is meant to be {emb}, "
                     f"set tie_word_embeddings=true",
            [head, emb]))
    if missing:
        notes.append(f"{len(missing)} architecture tensor(s) are absent from the files and tied to nothing stored, "
                     f"so transformers initialises them on load (e.g. {', '.join(missing[:3])})")
    if unexpected:
        notes.append(f"{len(unexpected)} tensor(s) in the files are not in {arch.name} (e.g. "
                     f"{', '.join(unexpected[:3])}); transformers ignores them on load")
    if converted:
        k, vs = next(iter(converted.items()))
        split = [len(v) > 1 for v in converted.values()]
        how = "split" if all(split) else "merged or split" if any(split) else "merged"
        notes.append(f"{len(converted)} tensor(s) in the files are {how} on load into {len(pieces)} tensor(s) of "
                     f"{arch.name} by transformers' conversion mapping (e.g. {k} -> {', '.join(vs)}); they are "
                     f"analysed as stored, under their file names")
    facts = {"missing": missing, "unexpected": unexpected, "absent_tied": [list(g) for g in absent_tied],
             "converted": {v: sorted(pieces[v]) for v in sorted(pieces)}}
    return tensors, findings, notes, facts, out_spans


def architecture_ties(groups: list[tuple[str, ...]]) -> str:
    """What the built architecture ties, in words that cannot be read as the files' tie groups
    (which the report counts below, and which differ where the files store two copies)."""
    if not groups:
        return "it ties no names"
    shown = "; ".join(" = ".join(g) for g in groups[:3])
    more = f" and {len(groups) - 3} more" if len(groups) > 3 else ""
    return f"it ties {shown}{more}"


class RenamedTensors(Mapping):
    """The files' tensors under the architecture's names, as transformers loads them: ``names`` maps
    each name to the file key whose tensor it is (a tied name the files drop maps to the one they
    store). Facts and file layouts come from the files' own mapping, renamed, so a folder of
    100,000 tensors makes no tensor and no ``fact_of`` per name where its loader need not;
    ``file_facts`` are those facts when the caller already built them."""

    def __init__(self, files: Mapping, names: dict[str, str], file_facts: list[TensorFact] | None = None):
        self._files, self._names, self._file_facts = files, names, file_facts

    def __getitem__(self, name: str):
        return self._files[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def file_layout(self, name: str) -> tuple[int, int, int] | None:
        """As the files' mapping says; for a plain dict of tensors, from the tensor (contiguous only)."""
        where = getattr(self._files, "file_layout", None)
        return where(self._names[name]) if callable(where) else tensor_layout(self[name])

    def facts(self) -> list[TensorFact]:
        by_file = {f.name: f for f in (self._file_facts if self._file_facts is not None
                                       else tensor_facts(self._files))}
        out = []
        for name, key in self._names.items():
            f = by_file[key]
            out.append(f if name == key else
                       dataclasses.replace(f, name=name, owner=name.rsplit(".", 1)[0] if "." in name else ""))
        return out


def config_vs_files(files: dict[str, Any], cfg: dict, spans: dict[str, Any] | None = None,
                    facts: list[TensorFact] | None = None) -> list[Finding]:
    """TC011 without an architecture: the config's tie setting against embedding and head found by name.
    ``facts`` are ``tensor_facts(files)`` when the caller already has them."""

    tie = cfg.get("tie_word_embeddings")
    if not isinstance(tie, bool):
        return []
    facts = facts if facts is not None else tensor_facts(files)
    embeds = [f for f in facts if is_embedding(f)]
    heads = [f for f in facts if is_output_projection(f) and not is_embedding(f)]
    out = []
    for e in embeds:
        for h in heads:
            pair = ((spans or {}).get(e.name), (spans or {}).get(h.name))
            if tie and h.shape == e.shape and h.dtype == e.dtype and _equal(files[e.name], files[h.name],
                                                                           pair) is False:
                out.append(finding(
                    "TC011", f"config.json says tie_word_embeddings=true, but the files store {e.name} and {h.name} "
                             f"with different content: engines that trust the config serve the embedding as the "
                             f"output projection", [e.name, h.name]))
    archs = [str(a) for a in cfg.get("architectures") or []]
    if tie is False and embeds and not heads and any(_LM_ARCH.search(a) for a in archs):
        out.append(finding(
            "TC011", f"config.json says tie_word_embeddings=false for {archs[0]}, but the files hold no output "
                     f"projection (only {embeds[0].name}): the head will be initialised randomly on load; if it is "
                     f"meant to be the embedding, set tie_word_embeddings=true", [embeds[0].name]))
    return out


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
        if not heads and embeds and any(_LM_ARCH.search(str(a)) for a in cfg.get("architectures") or []):
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
