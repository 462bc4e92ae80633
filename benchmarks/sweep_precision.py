"""Precision sweep: every language-model class transformers registers, held against transformers itself.

Not part of the default benchmark suite (it takes an hour or more on two cores). Run it as a script::

    python benchmarks/sweep_precision.py                      # every class, resumable
    python benchmarks/sweep_precision.py --shard 1/4          # a quarter of them
    python benchmarks/sweep_precision.py --only LlamaForCausalLM T5ForConditionalGeneration
    python benchmarks/sweep_precision.py --summary            # the counts from what is recorded

Every class of transformers' auto mappings for causal LM, masked LM, seq2seq LM, image-text-to-text
(vision-to-sequence where the installed transformers still has that mapping) and speech seq2seq is
built from a small config (:func:`small_configs`: widths, layers and vocabulary cut, each candidate
validated on the meta device) with real weights, tied and untied where the config allows, in three
states: the live module, a ``save_pretrained`` folder and a ``torch.save(model.state_dict())`` file.

Each state is inspected with ``tiecheck.analyze`` and held against what transformers and accelerate
say of it:

* the live module: tie groups against accelerate's ``find_tied_parameters``;
* the folder: ``from_pretrained(folder, output_loading_info=True)`` gives the missing and unexpected
  keys, the names that are one Parameter after loading and whether every stored value (the head's
  included) survives; tiecheck's missing and unexpected keys and tie groups are compared with them;
* the file: the names that share storage in the saved state dict.

A state transformers round-trips faithfully is clean: a warning or error finding on it is a false
alarm, and ``--fail-on warning`` must exit 0. A planted broken variant per class (the head cloned
where it is tied; the head replaced where it is untied while the config is set to say tied) must
give an error naming the head and its embedding (exit 1). FLOPs are counted on the live module; a
class without them must give a sentence as the reason.

Results are appended, one JSON line per class, to ``--out`` (a class already there is skipped, so
an interrupted run resumes); each class runs in a worker process with a timeout. ``--summary``
writes the counts and one line per class to ``--summary-out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import accelerate
import torch
import transformers
from accelerate.utils import find_tied_parameters
from safetensors.torch import load_file, save_file
from sweep_architectures import complete_defaults
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import modeling_auto

import tiecheck
from tiecheck.loaders.declared import embedding_names

RESULTS = Path(__file__).parent / "results"
TASKS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "image-text-to-text": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "vision-to-seq": "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
    "speech-seq2seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
}
# A small config's model may hold at most this many parameters (float32: 4 bytes each): the three
# states, from_pretrained and the planted variants each hold a copy.
MAX_PARAMS = 150_000_000
SMALL_VOCAB = 1024
LAYERS = 2
# An exception's text as a reason ("AttributeError: 'NoneType' ...") is not a sentence.
RAW_EXCEPTION = re.compile(r"\b[A-Z]\w*(Error|Exception)\b:|Traceback \(most recent call last\)")


# -- what transformers registers ---------------------------------------------------------------

def registered_classes() -> dict[str, dict[str, Any]]:
    """Class name -> {"model_type", "tasks"} over the auto mappings of :data:`TASKS`, each class once."""

    out: dict[str, dict[str, Any]] = {}
    for task, attr in TASKS.items():
        mapping = getattr(modeling_auto, attr, None)
        if mapping is None:
            continue
        for model_type, names in mapping.items():
            for name in (names,) if isinstance(names, str) else names:
                entry = out.setdefault(name, {"model_type": model_type, "tasks": []})
                entry["tasks"].append(task)
    return dict(sorted(out.items()))


def missing_mappings() -> list[str]:
    """The mappings of :data:`TASKS` this transformers does not have (merged into another one)."""

    return [task for task, attr in TASKS.items() if getattr(modeling_auto, attr, None) is None]


# -- small configs -----------------------------------------------------------------------------

LAYER_FIELD = re.compile(r"^(num_hidden_layers|num_layers|n_layer|n_layers|num_decoder_layers|decoder_layers|"
                         r"num_encoder_layers|encoder_layers|depth|decoder_num_layers|num_global_layers|"
                         r"speech_encoder_layers|conf_num_hidden_layers|layers)$")
# Widths: every one is divided by the same factor, so relations such as hidden = heads * head_dim hold.
WIDTH_FIELD = re.compile(r"(hidden_size|intermediate_size|_dim$|^dim$|d_model$|^d_ff$|d_kv$|d_inner$|^n_embd$|"
                         r"^n_inner$|^dff$|^dim_ff$|_rank$|kv_channels$|d_head$|^d_rel$|ffn_dim|mlp_dim|"
                         r"embedding_size|emb_dim$|ffn_hidden_size$|moe_hidden_size$|lru_width$|"
                         r"feed_forward_size$|head_size$|hidden_dim$|headdim$|_width$)")
NOT_WIDTH = re.compile(r"(vocab|token|max_|position|patch|image_size|window|chunk|kernel|stride|num_|^n_(?!embd|inner)|bucket|"
                       r"seq|length|mel|sampl|hop|frame|channels_|codebook)")
HEAD_DIM_FIELD = re.compile(r"(head_dim|^d_kv$|^kv_channels$|^d_head$|attention_head_size|head_size$)")
HEADS_FIELD = re.compile(r"(num_attention_heads|num_heads|^n_head$|^n_heads$|attention_heads$)")
TOKEN_FIELD = re.compile(r"(token_id|token_index|_id$|^id_)")
EXPERTS_FIELD = re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts)$")
ROUTED_FIELD = re.compile(r"^(num_experts_per_tok|num_experts_per_token|moe_topk|moe_k)$")
GROUP_FIELD = re.compile(r"^(n_group|topk_group|num_expert_group)$")
EXPERTS = 4
INDEX_LIST = re.compile(r"(_ids|_indices|_idxs|_idx)$")


def sub_configs(cfg) -> Iterator[Any]:
    """``cfg`` and every config nested in it (text_config, vision_config, encoder, decoder, ...)."""

    seen = set()
    stack = [cfg]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        yield c
        for v in list(vars(c).values()):
            if isinstance(v, PretrainedConfig):
                stack.append(v)


def _ints(c) -> dict[str, int]:
    return {k: v for k, v in vars(c).items() if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}


def _head_dims(c) -> list[int]:
    """The per-head widths a config implies: its explicit head dims and hidden / heads."""
    ints = _ints(c)
    dims = [v for k, v in ints.items() if HEAD_DIM_FIELD.search(k) and v > 0]
    heads = next((v for k, v in ints.items() if HEADS_FIELD.search(k) and v > 0), None)
    hidden = ints.get("hidden_size") or ints.get("d_model") or ints.get("n_embd")
    if heads and hidden and hidden % heads == 0:
        dims.append(hidden // heads)
    return dims


def cut_layers(cfg, n: int = LAYERS) -> None:
    """Every layer count above ``n`` cut to ``n``, with the per-layer lists of the same config; where a list
    of layer kinds (``layer_types``) has more kinds than that, the first layer of each kind is kept, so a
    hybrid model keeps an attention layer beside its linear-attention ones."""
    for c in sub_configs(cfg):
        for k, v in _ints(c).items():
            if not (LAYER_FIELD.match(k) and v > n):
                continue
            per_layer = {name: lst for name, lst in vars(c).items() if isinstance(lst, list) and len(lst) == v}
            keep = list(range(n))
            for lst in per_layer.values():
                if all(isinstance(x, str) for x in lst):
                    firsts = sorted({x: i for i, x in reversed(list(enumerate(lst)))}.values())
                    keep = sorted(set(keep) | set(firsts))
            setattr(c, k, len(keep))
            for name, lst in per_layer.items():
                setattr(c, name, [lst[i] for i in keep])
            # Lists of layer indices (Zamba2's hybrid_layer_ids) and tables keyed by layer index (Dots3's
            # per_layer_config) follow the layers kept.
            for name, val in list(vars(c).items()):
                if (INDEX_LIST.search(name) and isinstance(val, list) and val and name not in per_layer
                        and all(isinstance(x, int) and 0 <= x < v for x in val)):
                    setattr(c, name, [keep.index(x) for x in val if x in keep])
                elif (isinstance(val, dict) and val and name != "rope_parameters"
                      and all(str(x).isdigit() and int(x) < v for x in val)):
                    setattr(c, name, {type(x)(keep.index(int(x))): y for x, y in val.items() if int(x) in keep})


def scale_widths(cfg, k: int) -> None:
    """Every width divided by ``k`` (rounded up to a whole number where it does not divide)."""
    if k == 1:
        return
    for c in sub_configs(cfg):
        for name, v in _ints(c).items():
            if v >= 2 * k and WIDTH_FIELD.search(name) and not NOT_WIDTH.search(name):
                setattr(c, name, max(1, math.ceil(v / k)))
        for rope in (getattr(c, "rope_parameters", None), getattr(c, "rope_scaling", None)):
            if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
                rope["mrope_section"] = shrink_sections(rope["mrope_section"], k)


def shrink_sections(sections: list[int], k: int) -> list[int]:
    """Multimodal RoPE sections (they sum to half the head width) for a head ``k`` times narrower."""
    total = max(len(sections), sum(sections) // k)
    out = [max(1, x // k) for x in sections]
    out[-1] += total - sum(out)
    return out


def cut_vocab(cfg, size: int = SMALL_VOCAB) -> None:
    """Vocabularies above ``size`` cut to it, and the token ids beyond moved inside it (from the top down)."""
    for c in sub_configs(cfg):
        ints = _ints(c)
        vocab = ints.get("vocab_size")
        if not vocab or vocab <= size:
            continue
        for name, v in ints.items():
            if "vocab_size" in name and v > size:
                setattr(c, name, size)
        moved = {}
        for name, v in sorted(vars(c).items()):
            if not TOKEN_FIELD.search(name):
                continue
            if isinstance(v, int) and not isinstance(v, bool) and v >= size:
                setattr(c, name, moved.setdefault(v, size - 1 - len(moved)))
            elif isinstance(v, list) and all(isinstance(x, int) for x in v) and any(x >= size for x in v):
                setattr(c, name, [moved.setdefault(x, size - 1 - len(moved)) if x >= size else x for x in v])


def complete_window(cfg) -> None:
    """A sliding-window layer kind with no window (Step3p7's default config): the model cannot run without
    one, so it gets a small one, as ``complete_defaults`` fills DeepSeek-V2's router."""
    for c in sub_configs(cfg):
        kinds = getattr(c, "layer_types", None) or []
        if getattr(c, "sliding_window", 0) is None and any("sliding" in str(k) for k in kinds):
            c.sliding_window = 64


def complete_placeholders(cfg) -> None:
    """A Q-Former model's image placeholder (BLIP-2, InstructBLIP): every released checkpoint sets
    ``image_token_index`` (a token of the text vocabulary its processor writes before the text), the default
    config leaves it None, and the forward then finds no image position. Set after ``cut_vocab``, so the id
    lies in the vocabulary the model is built with."""
    for name in ("image_token_index", "video_token_index"):  # InstructBLIP-Video: its frames' placeholder
        if getattr(cfg, "num_query_tokens", None) and getattr(cfg, name, 0) is None:
            setattr(cfg, name, cfg.get_text_config().vocab_size - 1)


def cut_experts(cfg, n: int = EXPERTS) -> None:
    """Mixture-of-experts layers cut to ``n`` experts, two routed a token, in one group."""
    for c in sub_configs(cfg):
        for name, v in _ints(c).items():
            if EXPERTS_FIELD.match(name) and v > n:
                setattr(c, name, n)
            elif ROUTED_FIELD.match(name) and v > 2:
                setattr(c, name, 2)
            elif GROUP_FIELD.match(name) and v > 1:
                setattr(c, name, 1)


def width_factors(cfg) -> list[int]:
    """Factors to try, largest first: per-head widths stay at 8 or more (rotary embeddings need room)."""
    dims = [d for c in sub_configs(cfg) for d in _head_dims(c)]
    smallest = min(dims) if dims else 64
    return [k for k in (16, 8, 4, 2) if smallest // k >= 8] + [1]


def default_config(cls, model_type: str):
    """The class's own config with its defaults: a text-only class registered under a multimodal model type
    (Qwen3_5ForCausalLM under qwen3_5) takes its text config, not the type's composite one."""
    base = AutoConfig.for_model(model_type)
    own = getattr(cls, "config_class", None)
    if own is not None and not isinstance(base, own):
        with contextlib.suppress(Exception):
            return own()
    return base


def small_configs(cls, model_type: str) -> Iterator[tuple[str, Any]]:
    """(label, config) candidates for ``cls``, smallest first; the default config last."""
    base = default_config(cls, model_type)
    for k in width_factors(base):
        for vocab in (True, False):
            for layers in (True, False):
                cfg = copy.deepcopy(base)
                complete_defaults(cfg)
                complete_window(cfg)
                scale_widths(cfg, k)
                cut_experts(cfg)
                if vocab:
                    cut_vocab(cfg)
                if layers:
                    cut_layers(cfg)
                complete_placeholders(cfg)
                yield f"widths/{k}{', vocab ' + str(SMALL_VOCAB) if vocab else ''}{', layers ' + str(LAYERS) if layers else ''}", cfg


def with_tie(cfg, tie: bool):
    """``cfg`` as a config.json saying ``tie_word_embeddings: tie`` (at the top and in every nested config that
    has the key) builds it: through ``from_dict``, so a config class that overrides the flag does so here too."""
    d = cfg.to_dict()

    def put(x: dict, top: bool) -> None:
        if top or "tie_word_embeddings" in x:
            x["tie_word_embeddings"] = tie
        for v in x.values():
            if isinstance(v, dict) and "model_type" in v:
                put(v, False)

    put(d, True)
    return type(cfg).from_dict(d)


def build(cls, cfg, device: str = "cpu"):

    with torch.device(device):
        model = cls._from_config(copy.deepcopy(cfg)) if hasattr(cls, "_from_config") else cls(copy.deepcopy(cfg))
    return model.eval()


def pick_config(cls, model_type: str) -> tuple[str | None, Any, int, list[str]]:
    """(label, config, parameters, errors): the smallest candidate that builds on meta within :data:`MAX_PARAMS`."""
    errors: list[str] = []
    try:
        candidates = list(small_configs(cls, model_type))
    except Exception as e:  # noqa: BLE001 - the default config itself does not build
        return None, None, 0, [one_line(e)]
    for label, cfg in candidates:
        try:
            # Through from_dict, as config.json would build it: the config class validates the cut values.
            cfg = type(cfg).from_dict(cfg.to_dict())
            model = build(cls, cfg, "meta")
        except Exception as e:  # noqa: BLE001 - the next candidate may build
            errors.append(f"{label}: {one_line(e)}")
            continue
        n = sum(p.numel() for p in model.parameters())
        if n <= MAX_PARAMS:
            return label, cfg, n, errors
        errors.append(f"{label}: {n:,} parameters")
    return None, None, 0, errors


def no_build_reason(errors: list[str]) -> str:
    """Why no config was picked: transformers' default config itself fails, or no cut of it fits the cap."""
    if not errors:
        return "no config"
    last = errors[-1]
    if not last.endswith(" parameters"):
        return f"the default config does not build with this transformers ({last.split(': ', 1)[1]})"
    return f"no cut config builds under {MAX_PARAMS:,} parameters (smallest tried: {errors[0]}; default widths: " \
           f"{last.split(': ', 1)[1]})"


def one_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {msg}"


# -- ground truth --------------------------------------------------------------------------------

def param_groups(model) -> list[list[str]]:
    """Names that are one Parameter (or one buffer) object, two or more per group."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return sorted(sorted(v) for v in by_id.values() if len(v) > 1)


def storage_groups(sd: dict) -> list[list[str]]:
    """Names of a state dict that share one memory extent."""
    by_mem: dict[tuple, list[str]] = {}
    for n, t in sd.items():
        if t.numel():
            by_mem.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(n)
    return sorted(sorted(v) for v in by_mem.values() if len(v) > 1)


def accelerate_groups(model) -> list[list[str]]:
    return sorted(sorted(g) for g in find_tied_parameters(model))


def report_groups(report, names: set[str] | None = None) -> list[list[str]]:
    """tiecheck's tie groups, restricted to ``names`` (e.g. parameters), two or more names each."""
    out = []
    for g in report.tie_groups:
        kept = sorted(n for n in g.names if names is None or n in names)
        if len(kept) > 1:
            out.append(kept)
    return sorted(out)


def ignored(cls, key: str, attr: str) -> bool:
    return any(re.search(p, key) for p in getattr(cls, attr, None) or [])


def load_truth(cls, folder: Path, saved: dict) -> dict[str, Any]:
    """What ``from_pretrained`` makes of ``folder``: loading info, Parameter groups, values that survive."""

    loaded, info = cls.from_pretrained(str(folder), output_loading_info=True)
    sd = loaded.state_dict()
    changed = sorted(k for k, t in saved.items() if k in sd and (sd[k].shape != t.shape or not torch.equal(sd[k], t)))
    head = loaded.get_output_embeddings() if hasattr(loaded, "get_output_embeddings") else None
    out = {"missing": sorted(info.get("missing_keys", [])), "unexpected": sorted(info.get("unexpected_keys", [])),
           "mismatched": sorted(str(m) for m in info.get("mismatched_keys", [])),
           "groups": param_groups(loaded), "changed": changed[:20], "n_changed": len(changed),
           "head_is_embedding": bool(head is not None and getattr(head, "weight", None) is not None
                                     and head.weight is getattr(loaded.get_input_embeddings(), "weight", None))}
    del loaded
    return out


# -- tiecheck ------------------------------------------------------------------------------------

def flops_of(report) -> dict[str, Any]:
    """The report's FLOPs section as its JSON has it (empty when not counted)."""
    return report.flops.to_dict() if report.flops is not None else {}


def findings_of(report, at_least: str = "warning") -> list[list[str]]:
    rank = {"info": 0, "warning": 1, "error": 2}
    return [[f.code, f.severity, ", ".join(f.names), f.message[:300]] for f in report.findings
            if rank[f.severity] >= rank[at_least] and f.ignored_by is None]


def inspect_state(target, **kw) -> tuple[Any, dict[str, Any]]:

    report = tiecheck.analyze(target, **kw)
    return report, {"findings": findings_of(report), "exit_warning": report.exit_code("warning"),
                    "exit_error": report.exit_code("error")}


def confirmed_by_torch(model, findings: list[list[str]]) -> list[str]:
    """The findings torch itself confirms on the live module, by code: a TC001 whose nn.Linear's declared
    features differ from the weight it holds (transformers' default Ovis2Config builds its lm_head from the
    top-level hidden_size and ties it to an embedding of text_config's): the claim is a fact, not an alarm."""
    out = []
    for code, _, names, _ in findings:
        if code != "TC001":
            continue
        for name in names.split(", "):
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
            w = getattr(owner, "weight", None)
            if isinstance(owner, nn.Linear) and w is not None and tuple(w.shape) != (owner.out_features,
                                                                                     owner.in_features):
                out.append(f"{code} {names}")
                break
    return out


def embedding_pair(model) -> tuple[str | None, str | None]:
    """(input embedding, output embedding) names as tiecheck's declared layer pairs them."""
    return embedding_names(model)


def names_pair(finding: list[str], head: str, embs: set[str]) -> bool:
    """The finding names the head and the embedding (by any name tied to it)."""
    names = set(finding[2].split(", "))
    return head in names and bool(names & embs)


# -- one class -----------------------------------------------------------------------------------

def class_and_config(name: str, model_type: str) -> tuple[dict[str, Any], Any, Any]:
    """(row, class, config): the class's row begun with its small config's label and parameters; class and
    config are None where the row has a status saying why there is none (no such class, nothing builds)."""
    out: dict[str, Any] = {"class": name, "model_type": model_type}
    cls = getattr(transformers, name, None)
    if cls is None:
        return {**out, "status": "no-class", "reason": f"transformers has no attribute {name}"}, None, None
    label, cfg, n_params, errors = pick_config(cls, model_type)
    if cfg is None:
        return {**out, "status": "no-build", "reason": no_build_reason(errors), "tried": errors}, None, None
    out.update(config=label, params=n_params)
    return out, cls, cfg


def sweep_class(name: str, model_type: str, work: Path, flops: bool = True) -> dict[str, Any]:

    out, cls, cfg = class_and_config(name, model_type)
    if cfg is None:
        return out
    variants = []
    seen_shapes = []
    for tie in (True, False):
        torch.manual_seed(0)
        try:
            c = with_tie(cfg, tie)
            model = build(cls, c)
        except Exception as e:  # noqa: BLE001 - recorded
            variants.append({"tie": tie, "status": "no-build", "reason": one_line(e)})
            continue
        groups = param_groups(model)
        if groups in seen_shapes:
            variants.append({"tie": tie, "status": "same", "reason": f"tie_word_embeddings={tie} builds the same "
                                                                     "ties as the other setting"})
            continue
        seen_shapes.append(groups)
        # Whether the flag ties the head in this class: the tied setting built it so (a class whose tie mapping
        # names no tie for its head loads it as stored whatever the flag says: nothing to plant there).
        flag_ties_head = any(v.get("head_is_embedding") for v in variants)
        variants.append(sweep_variant(cls, model, tie, work / f"{'tied' if tie else 'untied'}",
                                      flops=flops and len(variants) == 0, flag_ties_head=flag_ties_head))
        del model
    out["variants"] = variants
    if not any(v.get("status") == "ok" for v in variants):
        return {**out, "status": "no-build", "reason": "; ".join(str(v.get("reason")) for v in variants)}
    stored_untied = [v for v in variants if v.get("status") == "ok" and not v["head_is_embedding"]]
    tied = [v for v in variants if v.get("status") == "ok" and v["head_is_embedding"]]
    if tied and not stored_untied:
        # The config cannot untie the head (T5Config forces the tie): the layout real checkpoints of
        # such a family ship (a trained head stored beside the embedding, the flag written false).
        torch.manual_seed(0)
        model = build(cls, with_tie(cfg, True))
        out["stored_untied"] = stored_untied_folder(cls, model, work / "stored-untied")
        del model
    flops_of = next((v.pop("flops") for v in variants if "flops" in v), None)
    if flops_of is not None and not flops_of["available"]:
        flops_of = {**default_config_flops(cls, model_type), "small_config": flops_of}
    if flops_of is not None:
        out["flops"] = flops_of
    out["status"] = "built"
    return out


def default_config_flops(cls, model_type: str) -> dict[str, Any]:
    """FLOPs of the default config with its layers cut, on the meta device (where the small config's forward
    failed: a width the sweep cut may not be one the forward accepts)."""

    try:
        cfg = default_config(cls, model_type)
        complete_defaults(cfg)
        complete_window(cfg)
        cut_layers(cfg)
        complete_placeholders(cfg)
        model = build(cls, cfg, "meta")
    except Exception as e:  # noqa: BLE001 - recorded
        return {"available": False, "reason": f"the default config does not build ({one_line(e)})", "readable": True,
                "on": "default config"}
    f = flops_of(tiecheck.analyze(model, flops=True, seq_len=32, duplicates=False))
    return {"available": bool(f.get("available")), "reason": f.get("reason"), "errors": f.get("errors"),
            "on": "default config, meta",
            "readable": bool(f.get("available")) or not RAW_EXCEPTION.search(str(f.get("reason")))}


def sweep_variant(cls, model, tie: bool, work: Path, flops: bool, flag_ties_head: bool) -> dict[str, Any]:

    work.mkdir(parents=True, exist_ok=True)
    emb, head = embedding_pair(model)
    # The embedding the head ties to (the decoder's in an encoder-decoder), as tiecheck's declared layer pairs them.
    head_is_embedding = bool(emb and head and model.get_parameter(head) is model.get_parameter(emb))
    v: dict[str, Any] = {"tie": tie, "status": "ok", "embedding": emb, "head": head,
                         "head_is_embedding": head_is_embedding, "groups": param_groups(model)}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    states: dict[str, Any] = {}

    # the live module
    t0 = time.perf_counter()
    report, st = inspect_state(model, flops=flops, seq_len=32)
    st["groups_agree"] = report_groups(report, params) == accelerate_groups(model)
    st["seconds"] = round(time.perf_counter() - t0, 2)
    st["confirmed"] = confirmed_by_torch(model, st["findings"])
    if flops:
        f = flops_of(report)
        v["flops"] = {"available": bool(f.get("available")), "reason": f.get("reason"), "errors": f.get("errors"),
                      "readable": bool(f.get("available")) or not RAW_EXCEPTION.search(str(f.get("reason")))}
    states["live"] = st

    # a save_pretrained folder
    folder = work / "folder"
    saved = {k: t.detach().clone() for k, t in model.state_dict().items()}
    model.save_pretrained(str(folder))
    report, st = inspect_state(folder)
    truth = load_truth(cls, folder, saved)
    hf = report.extra.get("hf", {}).get("architecture") or {}
    st["truth"] = truth
    st["tiecheck"] = {"missing": sorted(hf.get("missing", [])), "unexpected": sorted(hf.get("unexpected", []))}
    missing = [k for k in truth["missing"] if not ignored(cls, k, "_keys_to_ignore_on_load_missing")]
    unexpected = [k for k in truth["unexpected"] if not ignored(cls, k, "_keys_to_ignore_on_load_unexpected")]
    st["clean"] = not missing and not unexpected and not truth["mismatched"] and not truth["n_changed"]
    # transformers does not report a missing key its _keys_to_ignore patterns cover: compared without those
    st["keys_agree"] = (sorted(k for k in st["tiecheck"]["missing"] if not ignored(cls, k, "_keys_to_ignore_on_load_missing")) == missing
                        and sorted(k for k in st["tiecheck"]["unexpected"] if not ignored(cls, k, "_keys_to_ignore_on_load_unexpected")) == unexpected)
    st["groups_agree"] = report_groups(report, params) == truth["groups"]
    states["folder"] = st

    # a torch.save(state_dict) file
    path = work / "state_dict.pt"
    sd = model.state_dict()
    torch.save(sd, path)
    report, st = inspect_state(path)
    st["groups_agree"] = report_groups(report) == storage_groups(sd)
    states["file"] = st
    v["states"] = states
    if not (head and emb):
        v["planted"] = {"skipped": "the model has no output embedding (get_output_embeddings) to tie"}
    elif not head_is_embedding and not flag_ties_head:
        v["planted"] = {"skipped": "tie_word_embeddings=true does not tie the head in this class (its tie mapping "
                                   "names no tie for it), so declaring it tied breaks nothing"}
    elif model.get_parameter(head).shape != model.get_parameter(emb).shape:
        v["planted"] = {"skipped": f"the head {list(model.get_parameter(head).shape)} and the embedding "
                                   f"{list(model.get_parameter(emb).shape)} differ in shape: no tie to break"}
    else:
        v["planted"] = planted(cls, model, head, emb, head_is_embedding, work / "planted")
    shutil.rmtree(work, ignore_errors=True)
    return v


def _module_at(model, name: str):
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return model.get_submodule(owner)


def planted(cls, model, head: str, emb: str, head_is_embedding: bool, work: Path) -> dict[str, Any]:
    """The broken variant: a cloned head where the head is tied; a replaced head declared tied where untied."""

    work.mkdir(parents=True, exist_ok=True)
    embs = {emb}.union(*[g for g in param_groups(model) if emb in g]) - {head}
    broken = copy.deepcopy(model)
    head_mod = _module_at(broken, head)
    out: dict[str, Any] = {}
    if head_is_embedding:
        # The tie broken in memory: a copy of the embedding as the head (load_state_dict(assign=True) does this).
        head_mod.weight = nn.Parameter(broken.get_parameter(emb).detach().clone())
        out["what"] = "head cloned from the tied embedding"
        _, out["live"] = inspect_state(broken)
        path = work / "state_dict.pt"
        torch.save(broken.state_dict(), path)
        _, out["file"] = inspect_state(path)
        # In files: the head trained apart while the config still says tied.
        with torch.no_grad():
            head_mod.weight.add_(0.5)
        folder = work / "folder"
        write_both(broken, folder, head)
        _, out["folder"] = inspect_state(folder)
    else:
        with torch.no_grad():
            head_mod.weight.normal_()
        for c in sub_configs(broken.config):
            if "tie_word_embeddings" in vars(c) or c is broken.config:
                c.tie_word_embeddings = True
        out["what"] = "head replaced, the config set to tie_word_embeddings=true"
        # With the flag on, the class's tie mapping names the embedding its head ties to (the decoder's).
        emb = embedding_pair(broken)[0] or emb
        embs = {emb}.union(*[g for g in param_groups(broken) if emb in g]) - {head}
        _, out["live"] = inspect_state(broken)
        folder = work / "folder"
        write_both(broken, folder, head)
        _, out["folder"] = inspect_state(folder)
        out["file"] = {"skipped": "a state dict declares no tie"}
    for st in out.values():
        if isinstance(st, dict) and "findings" in st:
            errs = [f for f in st["findings"] if f[1] == "error"]
            st["detected"] = st["exit_error"] == 1 and any(names_pair(f, head, embs) for f in errs)
    del broken
    shutil.rmtree(work, ignore_errors=True)
    return out


def write_both(model, folder: Path, head: str) -> None:
    """``save_pretrained``, then the head written into its file beside what it saved (the embedding), as a
    checkpoint whose head was trained apart from the embedding holds it."""

    model.save_pretrained(str(folder))
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"save_pretrained wrote {len(files)} safetensors files; the sweep writes the head into one")
    sd = load_file(str(files[0]))
    sd[head] = model.state_dict()[head].detach().clone().contiguous()
    save_file(sd, str(files[0]), metadata={"format": "pt"})


def stored_untied_folder(cls, model, work: Path) -> dict[str, Any]:
    """A folder holding a head trained apart from the embedding with ``tie_word_embeddings: false`` as written."""

    emb, head = embedding_pair(model)
    if not (emb and head):
        return {"skipped": "no output embedding"}
    head_mod = _module_at(model, head)
    head_mod.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone() + 0.5)
    folder = work / "folder"
    write_both(model, folder, head)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tie_word_embeddings"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    saved = {k: t.detach().clone() for k, t in model.state_dict().items()}
    _report, st = inspect_state(folder)
    truth = load_truth(cls, folder, saved)
    st["truth"] = truth
    st["head_survives"] = head not in truth["changed"] and not truth["head_is_embedding"]
    st["clean"] = st["head_survives"] and not truth["missing"] and not truth["unexpected"]
    shutil.rmtree(work, ignore_errors=True)
    return st


# -- the worker and the runner -------------------------------------------------------------------

def worker(names: list[str], out: Path, flops: bool) -> None:
    """Sweep ``names`` one after another, appending one JSON line per class to ``out``."""

    def one(name: str, model_type: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
            return sweep_class(name, model_type, Path(tmp), flops=flops)

    append_rows(names, out, one)


def append_rows(names: list[str], out: Path, sweep_one: Callable[[str, str], dict[str, Any]]) -> None:
    """``sweep_one(name, model_type)`` for each of ``names``, one JSON line per class appended to ``out``; a class
    that raises is recorded as a sweep error and the next one swept."""

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    classes = registered_classes()
    for name in names:
        entry = classes[name]
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                row = sweep_one(name, entry["model_type"])
        except Exception as e:  # noqa: BLE001 - one class must not stop the sweep
            row = {"class": name, "model_type": entry["model_type"], "status": "sweep-error",
                   "reason": one_line(e), "traceback": traceback.format_exc()[-2000:]}
        row["tasks"] = entry["tasks"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def done(out: Path) -> dict[str, dict]:
    rows = {}
    if out.exists():
        for line in out.read_text().splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                rows[row["class"]] = row
    return rows


def run(names: list[str], out: Path, timeout: float, flops: bool, batch: int = 25, script: str = __file__) -> None:
    """The classes in worker processes of ``batch`` classes each; a class that takes longer than ``timeout``
    seconds, or crashes its worker, is recorded as such and the worker restarted on the rest. ``script`` is
    the sweep whose ``--worker`` mode runs them (another sweep reuses this runner)."""
    todo = list(names)
    while todo:
        chunk = todo[:batch]
        cmd = [sys.executable, script, "--worker", "--out", str(out), "--only", *chunk] + ([] if flops else ["--no-flops"])
        proc = subprocess.Popen(cmd, start_new_session=True)
        last, n_done = time.monotonic(), 0
        rc = None
        while True:
            try:
                rc = proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                now_done = sum(1 for n in chunk if n in done(out))
                if now_done != n_done:
                    n_done, last = now_done, time.monotonic()
                    print(f"  {len(names) - len(todo) + n_done}/{len(names)} done", flush=True)
                elif time.monotonic() - last > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
        finished = done(out)
        rest = [n for n in chunk if n not in finished]
        if rest and (rc is None or rc != 0):
            row = {"class": rest[0], "status": "timeout" if rc is None else "crashed",
                   "reason": f"no result within {timeout:.0f} s" if rc is None else f"the worker exited with {rc}"}
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            rest = rest[1:]
        todo = rest + todo[batch:]


# -- the summary ---------------------------------------------------------------------------------

def summarize(rows: dict[str, dict], versions: str) -> str:
    classes = registered_classes()
    built = [r for r in rows.values() if r.get("status") == "built"]
    states = Counter()
    false_by_code: Counter = Counter()
    false_rows: list[str] = []
    true_rows: list[str] = []  # findings on a clean state that torch confirms (the model's own inconsistency)
    planted_n = Counter()
    disagree: list[str] = []
    for r in built:
        for v in r.get("variants", []):
            if v.get("status") != "ok":
                continue
            for state, st in v["states"].items():
                clean = st.get("clean", True)
                states["clean" if clean else "not-clean"] += 1
                if clean:
                    states["clean-exit-0"] += st["exit_warning"] == 0
                    for f in st["findings"]:
                        where = f"{r['class']} ({'tied' if v['tie'] else 'untied'}, {state}): {f[1]} {f[0]} {f[3]}"
                        if f"{f[0]} {f[2]}" in st.get("confirmed", []):
                            true_rows.append(where)
                            continue
                        false_by_code[f[0]] += 1
                        false_rows.append(where)
                if st.get("groups_agree") is False:
                    disagree.append(f"{r['class']} ({'tied' if v['tie'] else 'untied'}, {state}): tie groups")
                if st.get("keys_agree") is False:
                    disagree.append(f"{r['class']} ({'tied' if v['tie'] else 'untied'}, {state}): missing/unexpected "
                                    f"keys (tiecheck {st['tiecheck']}, transformers "
                                    f"{ {k: st['truth'][k] for k in ('missing', 'unexpected')} })")
            for state, st in v.get("planted", {}).items():
                if isinstance(st, dict) and "detected" in st:
                    planted_n["planted"] += 1
                    planted_n["detected"] += st["detected"]
                    if not st["detected"]:
                        false_rows.append(f"{r['class']} ({'tied' if v['tie'] else 'untied'}, planted {state}): "
                                          f"missed; findings {st['findings']}")
        su = r.get("stored_untied")
        if isinstance(su, dict) and "findings" in su:
            states["clean" if su["clean"] else "not-clean"] += 1
            if su["clean"]:
                states["clean-exit-0"] += su["exit_warning"] == 0
                for f in su["findings"]:
                    false_by_code[f[0]] += 1
                    false_rows.append(f"{r['class']} (stored untied, folder): {f[1]} {f[0]} {f[3]}")
    with_flops = [r for r in built if r.get("flops", {}).get("available")]
    unreadable = [r for r in built if r.get("flops") and not r["flops"]["readable"]]
    left_out = [r for r in rows.values() if r.get("status") != "built"]
    head = [
        f"{versions}",
        f"classes registered: {len(classes)} (mappings: {', '.join(t for t in TASKS if t not in missing_mappings())}"
        + (f"; not in this transformers: {', '.join(missing_mappings())}" if missing_mappings() else "") + ")",
        f"classes swept: {len(rows)}; built: {len(built)}; left out: {len(left_out)}",
        f"clean states: {states['clean']} ({states['clean-exit-0']} exit 0 under --fail-on warning); states "
        f"transformers itself does not round-trip: {states['not-clean']}",
        f"findings on clean states that torch confirms (the model built from transformers' default config is "
        f"itself inconsistent): {len(true_rows)}",
        f"false findings (warning or error on a clean state): {sum(false_by_code.values())}"
        + (f" ({', '.join(f'{c} {n}' for c, n in sorted(false_by_code.items()))})" if false_by_code else ""),
        f"planted broken variants: {planted_n['planted']}; detected (an error naming head and embedding, exit 1): "
        f"{planted_n['detected']}",
        f"FLOPs counted: {len(with_flops)} of {len(built)} built ({len(with_flops) / max(len(built), 1):.1%}); "
        f"reasons that are raw exception text: {len(unreadable)}",
        f"disagreements with transformers/accelerate (tie groups, missing/unexpected keys): {len(disagree)}",
        "",
    ]
    body = ["## false findings and missed plants"] + (false_rows or ["none"]) + [""]
    body += ["## findings torch confirms on a clean state"] + (true_rows or ["none"]) + [""]
    body += ["## disagreements"] + (disagree or ["none"]) + [""]
    body += ["## left out"] + [f"{r['class']:48s} {r.get('status')}: {r.get('reason')}" for r in
                               sorted(left_out, key=lambda r: r["class"])] + [""]
    body += ["## FLOPs not counted"] + [f"{r['class']:48s} {r['flops']['reason']}" for r in built
                                        if r.get("flops") and not r["flops"]["available"]] + [""]
    body += ["## classes"] + [class_line(r) for r in sorted(rows.values(), key=lambda r: r["class"])]
    return "\n".join(head + body) + "\n"


def class_line(r: dict) -> str:
    if r.get("status") != "built":
        return f"{r['class']:48s} {r.get('status')}"
    vs = [v for v in r.get("variants", []) if v.get("status") == "ok"]
    kinds = "/".join("tied" if v["head_is_embedding"] else "untied" for v in vs)
    nfind = sum(len(st["findings"]) for v in vs for st in v["states"].values() if st.get("clean", True))
    f = r.get("flops") or {}
    return (f"{r['class']:48s} built ({r.get('config')}; {r.get('params', 0):,} params) {kinds or '-'}; "
            f"false findings {nfind}; FLOPs {'yes' if f.get('available') else 'no'}; {r.get('seconds', 0)} s")


def versions() -> str:


    return (f"tiecheck {tiecheck.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
            f"accelerate {accelerate.__version__}")


def sweep_arguments(doc: str, stem: str, timeout: float) -> argparse.ArgumentParser:
    """The arguments of a class sweep; its results go to ``results/<stem>.jsonl`` and ``results/<stem>.txt``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="class names to sweep (default: every registered class)")
    ap.add_argument("--shard", help="i/n: the i-th of n equal slices of the classes (1-based)")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{stem}.jsonl")
    ap.add_argument("--summary-out", type=Path, default=RESULTS / f"{stem}.txt")
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds per class")
    ap.add_argument("--redo", action="store_true", help="sweep the classes again even if --out has them")
    ap.add_argument("--summary", action="store_true", help="only write the summary of what --out holds")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


def sweep_selected(args: argparse.Namespace, flops: bool, script: str) -> None:
    """The classes ``--only`` and ``--shard`` select, less those ``--out`` holds (unless ``--redo``), swept by
    ``script``'s workers."""
    names = list(args.only or registered_classes())
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        names = names[i - 1::n]
    rows = done(args.out)
    if args.redo:
        keep = [line for line in args.out.read_text().splitlines()
                if json.loads(line)["class"] not in set(names)] if args.out.exists() else []
        args.out.write_text("".join(line + "\n" for line in keep))
        rows = {}
    todo = [n for n in names if n not in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run(todo, args.out, args.timeout, flops, script=script)
    print(f"swept {len(todo)} classes in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = sweep_arguments(__doc__, "sweep-precision", 600)
    ap.add_argument("--no-flops", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.only, args.out, not args.no_flops)
        return
    if not args.summary:
        sweep_selected(args, not args.no_flops, __file__)
    text = summarize(done(args.out), versions())
    args.summary_out.write_text(text)
    print(text.split("\n\n")[0])


if __name__ == "__main__":
    main()
