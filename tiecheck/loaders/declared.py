"""Ties as formats and frameworks declare them, read where they live.

A declaration is a claim, not a fact: a flag in ``config.json``, an alias map in a safetensors
header, a class's ``_tied_weights_keys``, a Megatron argument. Each is recorded with where it
came from (file, key, config path) and, where it names tensors, turned into *pairs*
``{"names": [target, source], "declared": bool, "by": [...]}`` that ``analyses/layers.py``
holds against memory (physical) and against the files (stored).

This module reads no tensor values. transformers is used where it is the authority (a config
class resolving a nested ``text_config``, a model's expanded tie mapping); it is only ever
handed objects the loaders already built.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Container, Mapping
from typing import Any

# A tensor name as state dicts spell it: dotted identifiers (``model.embed_tokens.weight``).
_TENSOR_NAME = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)+$")
# Config keys transformers reads as tie declarations.
TIE_KEYS = ("tie_word_embeddings", "tie_encoder_decoder")
# Megatron-LM: ``--untie-embeddings-and-output-weights`` (args) and Megatron-core's model flag.
MEGATRON_KEYS = ("share_embeddings_and_output_weights", "untie_embeddings_and_output_weights")
MEGATRON_EMBEDDING = ("embedding.word_embeddings.weight", "language_model.embedding.word_embeddings.weight",
                      "word_embeddings.weight")
MEGATRON_OUTPUT = ("output_layer.weight", "language_model.output_layer.weight")
MAX_DEPTH = 4  # nested configs (text_config, decoder, ...) are one or two levels deep


def declaration(kind: str, value: Any, *, file: str | None = None, key: str | None = None,
                **more: Any) -> dict[str, Any]:
    """One declaration as the report shows it: what, its value and where it came from."""
    origin = {k: v for k, v in (("file", file), ("key", key)) if v is not None}
    return {"kind": kind, "value": value, "origin": origin, **more}


def pair(target: str, source: str, declared: bool, by: str, written: list[bool] | None = None) -> dict[str, Any]:
    """One declared pair; ``written`` holds the values a config file writes for the flag that declares it,
    where the value a class resolves may differ (T5Config resolves tie_word_embeddings to true whatever
    config.json says)."""
    out = {"names": [target, source], "declared": declared, "by": [by]}
    if written is not None:
        out["written"] = list(written)
    return out


def merge_pairs(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per set of names; a row whose declarations disagree keeps every one in ``by``."""
    out: dict[frozenset, dict[str, Any]] = {}
    for p in pairs:
        k = frozenset(p["names"])
        claims = dict(p.get("claims") or {b: p["declared"] for b in p["by"]})  # merged rows keep theirs
        if k in out:
            row = out[k]
            row["by"] += [b for b in p["by"] if b not in row["by"]]
            row["claims"].update({b: v for b, v in claims.items() if b not in row["claims"]})
            if "written" in p:
                row["written"] = row.get("written", []) + [v for v in p["written"] if v not in row.get("written", [])]
        else:
            out[k] = row = {**p, "by": list(p["by"]), "claims": claims}
        row["conflict"] = len(set(row["claims"].values())) > 1
    return list(out.values())


# -- safetensors __metadata__ ------------------------------------------------------------------

def alias_map(metadata: Mapping[str, str], stored: Container[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(aliases, broken) from a safetensors ``__metadata__``.

    ``safetensors.torch.save_model`` and ``huggingface_hub.save_torch_state_dict`` drop every
    shared name but one and record ``{dropped_name: kept_name}`` in ``__metadata__`` (beside
    free-form entries such as ``{"format": "pt"}``). An entry is an alias when its value is a
    stored tensor; an entry whose key and value both look like tensor names but whose value is
    not stored is a broken alias (the map names a key the file does not hold).
    """
    aliases, broken = {}, {}
    for k, v in metadata.items():
        if not isinstance(v, str) or k == v:
            continue
        if v in stored:
            aliases[k] = v
        elif _TENSOR_NAME.match(k) and _TENSOR_NAME.match(v):
            broken[k] = v
    return aliases, broken


def alias_declarations(aliases: Mapping[str, str], broken: Mapping[str, str], file: str
                       ) -> tuple[list[dict], list[dict]]:
    decls, pairs = [], []
    if aliases or broken:
        decls.append(declaration("alias_map", dict(aliases), file=file, key="__metadata__",
                                 **({"broken": dict(broken)} if broken else {})))
    for dropped, kept in aliases.items():
        pairs.append(pair(dropped, kept, True, f"{file} __metadata__"))
    return decls, pairs


# -- config.json: tie_word_embeddings, tie_encoder_decoder, top level and nested -----------------

def raw_config_ties(cfg: Mapping[str, Any], file: str = "config.json") -> tuple[list[dict], list[str]]:
    """Every tie key in a config dict, at any nesting depth, with its path; and notes on bad values."""
    decls, notes = [], []

    def walk(d: Mapping[str, Any], path: str, depth: int) -> None:
        for k, v in d.items():
            here = f"{path}.{k}" if path else str(k)
            if k in TIE_KEYS:
                if isinstance(v, bool):
                    decls.append(declaration(k, v, file=file, key=here))
                elif v is not None:
                    notes.append(f"{file}: {here} is {v!r}, not true or false; ignored as a declaration")
            elif isinstance(v, Mapping) and depth < MAX_DEPTH:
                walk(v, here, depth + 1)

    walk(cfg, "", 0)
    return decls, notes


def resolved_tie(config: Any, raw: list[dict], file: str = "config.json", path: str = "") -> dict | None:
    """What the config class makes of ``tie_word_embeddings`` (e.g. LlavaConfig copies text_config's);
    ``path`` is where that config sits in config.json ("" at the top, "decoder" for an encoder-decoder's)."""
    value = getattr(config, "tie_word_embeddings", None)
    if not isinstance(value, bool):
        return None
    return declaration("tie_word_embeddings", value, file=file, key=_under(path, "tie_word_embeddings"),
                       resolved_by=type(config).__name__,
                       paths=[d["origin"]["key"] for d in raw if d["kind"] == "tie_word_embeddings"])


def _under(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def governing_config(model: Any, head: str | None) -> tuple[Any, str]:
    """(config, its path in config.json) of the sub-model whose flag decides ``head``'s tie.

    transformers reads ``tie_word_embeddings`` from each sub-model's own config (5.x expands every
    ``PreTrainedModel`` inside a model with that model's config): an ``EncoderDecoderModel``'s head
    belongs to its decoder, whose config sits under ``decoder`` in config.json. The deepest sub-model
    holding ``head`` and a config with the flag decides; the top config where none does, or where
    the sub-model's config is not found in the top one (it is then not what config.json holds).
    """
    top = getattr(model, "config", None)
    if head is None or top is None:
        return top, ""
    best, best_path = top, ""
    for prefix, sub in model.named_modules():
        cfg = getattr(sub, "config", None)
        if not prefix or cfg is None or cfg is top or not head.startswith(prefix + "."):
            continue
        if isinstance(getattr(cfg, "tie_word_embeddings", None), bool) and len(prefix) > len(best_path or ""):
            found = _config_path(top, cfg)
            if found is not None:
                best, best_path = cfg, found
    return best, best_path


def _config_path(top: Any, target: Any, depth: int = 0) -> str | None:
    """The attribute path from config ``top`` to the config object ``target`` ("decoder", "text_config")."""
    for k, v in vars(top).items():
        if v is target:
            return k
        if depth < MAX_DEPTH and hasattr(v, "to_dict") and not isinstance(v, type):
            inner = _config_path(v, target, depth + 1)
            if inner is not None:
                return f"{k}.{inner}"
    return None


def model_declarations(model: Any, raw_cfg: Mapping[str, Any] | None, *, input_name: str | None,
                       output_name: str | None, expanded: Mapping[str, str] | None = None,
                       file: str = "config.json") -> tuple[list[dict], list[dict], list[str]]:
    """Declarations of a transformers model (built from a folder's config, or live): the config's
    tie keys as written and as the class resolves them, and the class's ``_tied_weights_keys``
    expanded as transformers expands them (regex keys included)."""
    config = getattr(model, "config", None)
    if raw_cfg is None:
        try:
            raw_cfg = config.to_dict() if config is not None else {}
        except Exception:  # noqa: BLE001 - a foreign config object: read what it has
            raw_cfg = {}
        file = f"{type(model).__name__}.config"
    decls, notes = raw_config_ties(raw_cfg, file)
    pairs: list[dict] = []
    if expanded is None and hasattr(model, "get_expanded_tied_weights_keys"):
        try:
            expanded = dict(model.get_expanded_tied_weights_keys(all_submodels=True))
        except Exception as e:  # noqa: BLE001 - transformers raises ValueError on a pattern that matches nothing
            notes.append(f"{type(model).__name__}._tied_weights_keys could not be expanded ({e})")
    governing, path = governing_config(model, output_name)
    # The written values that speak for the governing config: all of them at the top (a class may copy a
    # nested one, as LlavaConfig copies text_config's), else those under its path only.
    under = [d for d in decls if not path or d["origin"]["key"].startswith(path + ".")]
    resolved = resolved_tie(governing, under, file, path) if governing is not None else None
    if resolved is not None:
        decls.append(resolved)
        if resolved["value"] and output_name and expanded is not None and not flag_reaches(expanded, output_name):
            # transformers ties what the class's tie mapping names, and the flag only switches that mapping on:
            # a class that names no tie for its head loads it as stored whatever the flag says.
            notes.append(f"{file} says tie_word_embeddings=true, but {type(model).__name__} ties nothing to "
                         f"{output_name} (its tie mapping does not name it): transformers loads it as stored, so the "
                         f"flag is not held against it")
        elif input_name and output_name and input_name != output_name:
            written = [d["value"] for d in under if d["kind"] == "tie_word_embeddings"]
            pairs.append(pair(output_name, input_name, resolved["value"],
                              f"{file} {resolved['origin']['key']} ({resolved['resolved_by']})", written))
            # A value written elsewhere (text_config, decoder) that the class overrides is still read by
            # engines that look there: it joins the row, which then records the disagreement.
            for d in under:
                if d["kind"] == "tie_word_embeddings" and d["value"] != resolved["value"]:
                    pairs.append(pair(output_name, input_name, d["value"], f"{file} {d['origin']['key']}", written))
    raw_keys = getattr(type(model), "_tied_weights_keys", None)
    if raw_keys:
        shown = dict(raw_keys) if isinstance(raw_keys, Mapping) else list(raw_keys)
        decls.append(declaration("tied_weights_keys", shown, key=f"{type(model).__name__}._tied_weights_keys",
                                 expanded=dict(expanded or {})))
        for target, source in (expanded or {}).items():
            pairs.append(pair(target, source, True, f"{type(model).__name__}._tied_weights_keys"))
    return decls, merge_pairs(pairs), notes


def flag_reaches(expanded: Mapping[str, str], head: str) -> bool:
    """Whether transformers' expanded tie mapping (built with the flag on) ties ``head`` to anything."""
    return head in expanded or head in expanded.values()


def flat_config_pairs(raw_cfg: Mapping[str, Any], embeddings: list[str], heads: list[str],
                      file: str = "config.json") -> tuple[list[dict], list[dict], list[str]]:
    """Without a built architecture: the top-level flag, held against the embedding and head found by name."""
    decls, notes = raw_config_ties(raw_cfg, file)
    top = raw_cfg.get("tie_word_embeddings")
    pairs = []
    if isinstance(top, bool) and embeddings and heads:
        pairs.append(pair(heads[0], embeddings[0], top, f"{file} tie_word_embeddings"))
    return decls, pairs, notes


# -- Megatron checkpoints --------------------------------------------------------------------

def megatron_declarations(obj: Any, names: set[str], file: str) -> tuple[list[dict], list[dict]]:
    """``args.share_embeddings_and_output_weights`` (or ``untie_embeddings_and_output_weights``)."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if args is None:
        return [], []
    get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
    for k in MEGATRON_KEYS:
        v = get(k, None)
        if isinstance(v, bool):
            share = v if k == MEGATRON_KEYS[0] else not v
            decls = [declaration("share_embeddings_and_output_weights", share, file=file, key=f"args.{k}")]
            emb = next((n for n in MEGATRON_EMBEDDING if n in names), None)
            out = next((n for n in MEGATRON_OUTPUT if n in names), None)
            if emb is not None and out is None:
                out = MEGATRON_OUTPUT[MEGATRON_EMBEDDING.index(emb)] if emb in MEGATRON_EMBEDDING[:2] else None
            pairs = [pair(out, emb, share, f"{file} args.{k}")] if emb and out else []
            return decls, pairs
    return [], []


def embedding_names(module: Any) -> tuple[str | None, str | None]:
    """(input embedding weight, output embedding weight) by module path, so a tied pair keeps two names."""
    paths: dict[int, str] = {}
    for p, m in module.named_modules(remove_duplicate=False):
        # A module reached under several paths (transformers 4's T5 shares one embedding as shared,
        # encoder.embed_tokens and decoder.embed_tokens) is named by its first, the one state_dict keeps.
        paths.setdefault(id(m), p)

    def name(getter: str) -> str | None:
        try:
            mod = getattr(module, getter)()
        except Exception:  # noqa: BLE001 - many models raise NotImplementedError here
            return None
        path = paths.get(id(mod))
        if path is None or getattr(mod, "weight", None) is None:
            return None
        return f"{path}.weight" if path else "weight"

    output = name("get_output_embeddings")
    return head_source(module, output) or name("get_input_embeddings"), output


def head_source(module: Any, head: str | None) -> str | None:
    """The embedding the model's own tie mapping ties ``head`` to.

    ``get_input_embeddings()`` is the encoder's in an encoder-decoder, while the head ties to the
    decoder's: Marian with separate vocabularies says so in its ``_tied_weights_keys``
    (``{"lm_head.weight": "model.decoder.embed_tokens.weight"}``), an ``EncoderDecoderModel`` in its
    decoder's. transformers' own expansion over every sub-model is asked first (5.x, where the
    config ties), then the module's plain mapping. None where neither names ``head`` (transformers 4
    lists targets only) or the name is no tensor of the module.
    """
    if head is None:
        return None
    sources = []
    if hasattr(module, "get_expanded_tied_weights_keys"):
        # transformers raises ValueError on a pattern that matches nothing
        with contextlib.suppress(Exception):
            sources.append(module.get_expanded_tied_weights_keys(all_submodels=True).get(head))
    mapping = getattr(module, "_tied_weights_keys", None)
    if isinstance(mapping, Mapping):
        sources.append(mapping.get(head))
    for source in sources:
        if isinstance(source, str) and source != head:
            try:
                module.get_parameter(source)
            except (AttributeError, TypeError):
                continue
            return source
    return None


def live_model_declarations(module: Any) -> tuple[list[dict], list[dict], list[str]]:
    """A transformers model passed in memory: its config and class, as for a folder."""
    if getattr(module, "config", None) is None or not hasattr(module, "get_input_embeddings"):
        return [], [], []
    inp, out = embedding_names(module)
    return model_declarations(module, None, input_name=inp, output_name=out)
