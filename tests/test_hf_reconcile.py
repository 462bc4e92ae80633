"""The files held against the architecture (``loaders/hf_reconcile.py``), where the report's later
layers would hide what it says: its own findings (TC010, TC011) read from ``reconcile`` and
``config_vs_files`` directly, and folders written by a transformers model's own ``save_pretrained``."""

from __future__ import annotations

import pytest
import torch

import tiecheck
from tiecheck.loaders.hf_architecture import Architecture
from tiecheck.loaders.hf_reconcile import config_vs_files, reconcile

from support.checkpoints import llama_tensors

transformers = pytest.importorskip("transformers")

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _arch(declared: dict[str, str]) -> Architecture:
    """A tied Llama as ``build_architecture`` describes it; ``declared`` empty as under transformers 4,
    whose tie mapping is not known (the output embedding is tied to the input one)."""
    return Architecture(name="LlamaForCausalLM", keys=[*list(llama_tensors()), HEAD], groups=[(HEAD, EMB)],
                        declared=declared, prefix="model", tie_word_embeddings=None,
                        input_embedding=EMB, output_embedding=HEAD, version="hand-made")


@pytest.mark.parametrize("declared", [{HEAD: EMB}, {}])
def test_tied_names_stored_with_different_content_are_tc010_named_from_the_embedding(declared):
    files = llama_tensors()
    files[HEAD] = files[EMB].clone()
    files[HEAD][3, 5] += 1.0
    _, findings, _, _, _ = reconcile(files, _arch(declared), True)
    (f,) = [f for f in findings if f.code == "TC010"]
    assert sorted(f.names) == sorted([EMB, HEAD])
    # the name transformers ties to comes first
    assert f.message.startswith(f"LlamaForCausalLM ties {EMB}, {HEAD}, but the files store both with different")


def test_an_untied_config_with_no_head_in_the_files_is_tc011_without_an_architecture():
    files = llama_tensors()
    files.pop(HEAD, None)
    cfg = {"tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}
    (f,) = config_vs_files(files, cfg)
    assert (f.code, list(f.names)) == ("TC011", [EMB])
    assert "the head will be initialised randomly on load" in f.message
    assert config_vs_files(files, {**cfg, "architectures": ["LlamaModel"]}) == []  # no head to miss
    assert config_vs_files(files, {"architectures": ["LlamaForCausalLM"]}) == []  # no flag: nothing to hold


def _llama(tie: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def test_a_tie_saved_once_has_no_redundant_bytes(tmp_path):
    _llama(True).save_pretrained(tmp_path)  # transformers drops the tied head from the files
    r = tiecheck.analyze(str(tmp_path))
    assert not [n for n in r.source.notes if "redundant bytes" in n]


def test_a_tied_group_with_no_name_stored_is_initialised_not_a_crash(tmp_path):
    """Files holding neither the embedding nor the head: transformers initialises both (one tensor, tied)."""
    model = _llama(True)
    model.save_pretrained(tmp_path)
    sd = {k: v for k, v in model.state_dict().items() if k not in (EMB, HEAD)}
    from safetensors.torch import save_file  # noqa: PLC0415 - the hf extra, with transformers
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert EMB in info["missing_keys"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    r = tiecheck.analyze(str(tmp_path))
    assert not [f for f in r.findings if f.code in ("TC010", "TC012")]
    assert any(f"e.g. {EMB}" in n and "initialises them on load" in n for n in r.source.notes)


def test_tied_names_stored_in_different_dtypes_are_not_compared():
    """A head stored in another dtype (a quantized or cast copy) is left to the packed-head check and the
    declared layer: no TC010 for values that cannot be compared bit for bit."""
    files = llama_tensors()
    files[HEAD] = files[EMB].to(torch.float16)
    _, findings, _, _, _ = reconcile(files, _arch({HEAD: EMB}), True)
    assert not [f for f in findings if f.code == "TC010"]
