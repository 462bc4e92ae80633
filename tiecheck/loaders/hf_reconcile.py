"""A Hugging Face folder's files held against its architecture: names matched, ties re-made or reported.

The files' keys are matched to the architecture's as transformers matches them on load (by name,
by its load-time key renames, by the renames of transformers 4); a tied name absent from the files
is re-tied (TC012), tied names stored twice with equal content are re-tied and with different
content reported (TC010), and the config's ``tie_word_embeddings`` is held against the architecture
and the files (TC011). Read by ``loaders/formats/hf.py``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tiecheck.facts import TensorFact, is_embedding, is_output_projection
from tiecheck.findings import Finding, finding
from tiecheck.loaders.content import TorchContentReader, tensor_layout
from tiecheck.loaders.declared import (
    flag_reaches,
)
from tiecheck.loaders.hf_architecture import Architecture
from tiecheck.loaders.hf_config_edits import built_config, config_class, value_text
from tiecheck.loaders.tensor_facts import fact_of, tensor_facts

# The architecture classes whose output is a vocabulary's logits (they have an output projection).
LM_ARCH = re.compile(r"(ForCausalLM|LMHeadModel|ForMaskedLM|ForConditionalGeneration|MTModel|WithLMHead)$")


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
                # eq is None for tensors without data (meta): their content is unknown, not equal.
                if eq and not _same_memory(stored[base], stored[n]):
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


def config_tie(cfg: Mapping[str, Any]) -> bool | None:
    """``tie_word_embeddings`` as transformers reads it from a config.json, without an architecture.

    A bool is taken as written (engines other than transformers read it so, and flan-t5's ``false``
    must not become the ``true`` ``T5Config`` makes of it). Any other value is what the folder's config
    class makes of it: transformers 5 refuses it in most classes (``LlamaConfig``: the folder does not
    load at all), while a class that declares no such field keeps it, and transformers ties by its
    truth (``NomicBertConfig`` keeps ``1``, and ``from_pretrained`` ties).

    Args:
        cfg: config.json as read.

    Returns:
        The flag as a bool; None where config.json has none, the class refuses it, or there is no
        class to ask (no transformers, an unknown ``model_type``).
    """
    written = cfg.get("tie_word_embeddings")
    if written is None or isinstance(written, bool):
        return written
    cls = config_class(cfg)
    config = built_config(cls, cfg) if cls is not None else None
    if config is None:
        return None
    # transformers reads the flag by its truth (``get_expanded_tied_weights_keys``).
    return bool(getattr(config, "tie_word_embeddings", False))


def _flag_text(written: Any, tie: bool) -> str:
    """The flag as config.json spells it, and how transformers reads it where that is not a bool."""
    text = f"tie_word_embeddings={value_text(written)}"
    return text if isinstance(written, bool) else f"{text} (which transformers reads as {str(tie).lower()})"


def config_vs_files(files: dict[str, Any], cfg: dict, spans: dict[str, Any] | None = None,
                    facts: list[TensorFact] | None = None) -> list[Finding]:
    """TC011 without an architecture: the config's tie setting (as ``config_tie`` reads it) against the
    embedding and head found by name. ``facts`` are ``tensor_facts(files)`` when the caller already has them."""

    tie = config_tie(cfg)
    if tie is None:
        return []
    said = _flag_text(cfg.get("tie_word_embeddings"), tie)
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
                    "TC011", f"config.json says {said}, but the files store {e.name} and {h.name} "
                             f"with different content: engines that trust the config serve the embedding as the "
                             f"output projection", [e.name, h.name]))
    archs = [str(a) for a in cfg.get("architectures") or []]
    if tie is False and embeds and not heads and any(LM_ARCH.search(a) for a in archs):
        out.append(finding(
            "TC011", f"config.json says {said} for {archs[0]}, but the files hold no output "
                     f"projection (only {embeds[0].name}): the head will be initialised randomly on load; if it is "
                     f"meant to be the embedding, set tie_word_embeddings=true", [embeds[0].name]))
    return out
