"""Validation against real architectures: transformers models from tiny configs (no downloads).

For every model, tiecheck's tie groups must equal what the architecture declares, i.e.
transformers' ``get_expanded_tied_weights_keys(all_submodels=True)`` (``{target: source}``,
already expanded from patterns and gated by ``tie_word_embeddings``) turned into groups; and,
for live modules, include every group accelerate's ``find_tied_parameters`` reports. Each model
is checked as a live module, a ``torch.save`` state dict, a ``save_pretrained`` folder
(safetensors, single and sharded) and a ``pytorch_model.bin`` folder. Differences between
these sources are documented in the README ("Validation against transformers").
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as tlog

import tiecheck

transformers = pytest.importorskip("transformers")
accelerate_utils = pytest.importorskip("accelerate.utils")


def _configs():
    v = 96
    dec = dict(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1)
    seq2seq = dict(vocab_size=v, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    return {
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=v, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                             bos_token_id=0, eos_token_id=0)),
        "bert-mlm": (BertForMaskedLM, BertConfig(vocab_size=v, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32,
                                                 max_position_embeddings=32)),
        "t5": (T5ForConditionalGeneration, T5Config(vocab_size=v, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                    num_heads=2)),
        "bart": (BartForConditionalGeneration, BartConfig(**seq2seq)),
        "llama-tied": (LlamaForCausalLM, LlamaConfig(**dec, tie_word_embeddings=True)),
        "llama-untied": (LlamaForCausalLM, LlamaConfig(**dec, tie_word_embeddings=False)),
        "gemma": (GemmaForCausalLM, GemmaConfig(**dec, head_dim=8)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**dec, tie_word_embeddings=True)),
        "marian": (MarianMTModel, MarianConfig(**seq2seq, pad_token_id=v - 1, decoder_start_token_id=v - 1)),
        "mbart": (MBartForConditionalGeneration, MBartConfig(**seq2seq)),
    }


MODELS = list(_configs())
FORMS = ["module", "state_dict", "safetensors_folder", "sharded_folder", "bin_folder"]


def declared_groups(model) -> list[list[str]]:
    """transformers' expanded {target: source} tie mapping as groups of names."""
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        parent[find(target)] = find(source)
    groups: dict[str, list[str]] = {}
    for n in list(parent):
        groups.setdefault(find(n), []).append(n)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Each model built once, with every saved form of it."""

    tlog.set_verbosity_error()
    out = {}
    for name, (cls, cfg) in _configs().items():
        torch.manual_seed(0)
        model = cls(cfg).eval()
        root = tmp_path_factory.mktemp(name)
        torch.save(model.state_dict(), root / "state_dict.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(root / "safetensors")
            model.save_pretrained(root / "sharded", max_shard_size="8KB")
            model.save_pretrained(root / "bin", safe_serialization=False)
        bin_dir = root / "bin"
        if not (bin_dir / "pytorch_model.bin").exists():
            # transformers 5 always writes safetensors and ignores safe_serialization=False; write what
            # transformers 4 wrote instead: the state dict, shared storage and all, with torch.save.
            for p in bin_dir.glob("*.safetensors*"):
                p.unlink()
            torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
        out[name] = {"model": model, "module": model, "state_dict": root / "state_dict.pt",
                     "safetensors_folder": root / "safetensors", "sharded_folder": root / "sharded",
                     "bin_folder": bin_dir}
    return out


def tie_groups(report) -> list[list[str]]:
    return sorted(list(g.names) for g in report.tie_groups)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", MODELS)
def test_groups_equal_what_the_architecture_declares(zoo, name, form):
    entry = zoo[name]
    report = tiecheck.analyze(entry[form] if form == "module" else str(entry[form]), duplicates=False)
    assert tie_groups(report) == declared_groups(entry["model"])
    # Ties are never errors or warnings on a healthy model, whatever the format.
    assert [f for f in report.findings if f.severity != "info"] == []
    if form in ("safetensors_folder", "sharded_folder"):
        absent = [f for f in report.findings if f.code == "TC012"]
        assert len(absent) == len(declared_groups(entry["model"]))  # one per tie the file dropped


@pytest.mark.parametrize("name", MODELS)
def test_live_groups_equal_accelerates(zoo, name):
    model = zoo[name]["model"]
    ours = {frozenset(g) for g in tie_groups(tiecheck.analyze(model, duplicates=False))}
    theirs = {frozenset(g) for g in accelerate_utils.find_tied_parameters(model)}
    assert ours == theirs


def test_sharded_folders_really_are_sharded(zoo):
    assert (zoo["gpt2"]["sharded_folder"] / "model.safetensors.index.json").is_file()


def test_class_attribute_alone_would_be_wrong(zoo):
    # An untied Llama still lists lm_head.weight in _tied_weights_keys ...
    untied = zoo["llama-untied"]["model"]
    assert "lm_head.weight" in type(untied)._tied_weights_keys
    assert declared_groups(untied) == []
    # ... and BART's class attribute names one pair of a four-way group.
    bart = zoo["bart"]["model"]
    assert len(type(bart)._tied_weights_keys) == 1
    assert len(declared_groups(bart)[0]) == 4


def test_content_pass_on_a_saved_folder_finds_no_broken_tie(zoo):
    report = tiecheck.analyze(str(zoo["t5"]["safetensors_folder"]))
    assert report.content.ran
    assert [f.code for f in report.findings if f.code == "TC005"] == []


def test_gpt2_counts_a_tie_once_where_torchinfo_counts_it_twice():
    cfg = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=2)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    s = tiecheck.analyze(model).summary
    assert s.params_unique == 172_288  # what the model has
    assert s.params_counted == 236_288  # the per-name sum torchinfo prints: the 64,000-entry wte twice
    assert s.params_counted - s.params_unique == 1000 * 64
