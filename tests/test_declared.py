"""Declared, physical, stored: declarations read where they live and held against memory and files."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.analyses.layers import Declaration, LayerRow
from tiecheck.cli import main

from support.checkpoints import write_safetensors

transformers = pytest.importorskip("transformers")

from support.hf import EMB, HEAD, tiny_llama  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")



pytestmark = pytest.mark.usefixtures("quiet_transformers")


def llama(tie: bool, seed: int = 0):
    return tiny_llama(tie, seed)


def codes(r) -> list[str]:
    return sorted(f.code for f in r.findings)


def only(r, code: str) -> dict:
    (f,) = [f for f in r.findings if f.code == code]
    return f


def folder(tmp_path, model, tensors: dict, name: str = "hf"):
    """save_pretrained's config beside the given tensors as model.safetensors."""
    d = tmp_path / name
    model.save_pretrained(d)
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
                                metadata={"format": "pt"})
    return d


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_save_model_alias_map_is_restored_as_a_tie_with_its_bytes(tmp_path):
    m = llama(tie=True)
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_model(m, str(path))
    r = tiecheck.analyze(str(path))
    assert [list(g.names) for g in r.tie_groups] == [[HEAD, EMB]]
    assert r.tie_groups[0].bytes_saved == 64 * 16 * 4
    assert r.summary.bytes_saved == 4096
    (decl,) = r.declared.declarations
    assert decl == Declaration("alias_map", {EMB: HEAD}, file="m.safetensors", key="__metadata__")
    assert r.declared.ties == (LayerRow(names=(EMB, HEAD), declared=True, by=("m.safetensors __metadata__",),
                                        physical="tied", stored="one copy", nbytes=4096),)
    assert codes(r) == []
    # The library's own loader restores the same tie into a fresh model.
    fresh = llama(tie=True, seed=1)
    safetensors_torch.load_model(fresh, str(path))
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_alias_map_naming_a_missing_key_is_a_finding(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", {"embed.weight": torch.ones(4, 2)},
                             metadata={"format": "pt", "head.weight": "gone.weight", "note": "not.an alias"})
    r = tiecheck.analyze(str(path))
    f = only(r, "TC020")
    assert f.severity == "warning"
    assert list(f.names) == ["gone.weight", "head.weight"]
    assert "holds no gone.weight" in f.message
    assert r.tie_groups == ()
    assert r.declared.ties == ()
    assert r.declared.declarations[0].more["broken"] == {"head.weight": "gone.weight"}


def test_declared_tied_but_head_stored_different_is_an_error_and_transformers_loads_it_untied(tmp_path):
    m = llama(tie=True)
    sd = state(m)
    sd[HEAD] = torch.randn_like(sd[EMB])
    d = folder(tmp_path, m, sd)
    r = tiecheck.analyze(str(d))
    f = only(r, "TC015")
    assert f.severity == "error"
    assert list(f.names) == [HEAD, EMB]
    assert "transformers 5 warns and loads them untied" in f.message
    (row,) = r.declared.ties
    assert (row.declared, row.physical, row.stored) == (True, "separate, different", "two different copies")
    assert list(row.by) == ["config.json tie_word_embeddings (LlamaConfig)", "LlamaForCausalLM._tied_weights_keys"]
    assert r.exit_code("error") == 1
    loaded = transformers.LlamaForCausalLM.from_pretrained(d)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, sd[HEAD])


def test_declared_tied_and_stored_twice_equal_is_wasted_disk_and_retied_on_load(tmp_path):
    m = llama(tie=True)
    d = folder(tmp_path, m, state(m))
    r = tiecheck.analyze(str(d))
    f = only(r, "TC016")
    assert f.severity == "warning"
    assert "4,096 bytes stored twice" in f.message
    (row,) = r.declared.ties
    assert (row.physical, row.stored) == ("tied", "two equal copies")
    loaded = transformers.LlamaForCausalLM.from_pretrained(d)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_declared_untied_with_one_copy_is_an_error_and_transformers_initialises_the_head(tmp_path):
    m = llama(tie=False)
    sd = {k: v for k, v in state(m).items() if k != HEAD}
    d = folder(tmp_path, m, sd)
    r = tiecheck.analyze(str(d))
    f = only(r, "TC017")
    assert f.severity == "error"
    assert "initialise lm_head.weight randomly" in f.message
    (row,) = r.declared.ties
    assert (row.declared, row.physical, row.stored) == (False, "absent", "one copy")
    loaded = transformers.LlamaForCausalLM.from_pretrained(d)
    assert not torch.equal(loaded.lm_head.weight, sd[EMB])


def tiny_llava(text_tie: bool, top: bool | None):
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=text_tie)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16)
    kw = {} if top is None else {"tie_word_embeddings": top}
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63, **kw)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg)


LLAVA_EMB = "model.language_model.embed_tokens.weight"


def llava_folder(tmp_path, m):
    """The config as save_pretrained writes it, the weights under the class's own names, the tied head dropped
    (transformers 5 writes Llava's weights under its legacy key names, which tiecheck does not convert yet)."""
    sd = {k: v for k, v in state(m).items() if k != HEAD}
    return folder(tmp_path, m, sd, "llava")


def test_nested_text_config_flag_is_resolved_as_the_config_class_resolves_it(tmp_path):
    m = tiny_llava(text_tie=True, top=None)
    d = llava_folder(tmp_path, m)
    raw = json.loads((d / "config.json").read_text())
    raw.pop("tie_word_embeddings", None)  # the flag only in text_config, as older checkpoints write it
    (d / "config.json").write_text(json.dumps(raw))
    r = tiecheck.analyze(str(d))
    decls = r.declared.declarations
    assert [(x.key, x.value) for x in decls if x.kind == "tie_word_embeddings"] == [
        ("text_config.tie_word_embeddings", True), ("tie_word_embeddings", True)]
    assert [x.more.get("resolved_by") for x in decls if x.kind == "tie_word_embeddings"] == [None, "LlavaConfig"]
    (row,) = r.declared.ties
    assert list(row.names) == [HEAD, LLAVA_EMB]
    assert row.declared
    assert row.stored == "one copy"
    assert row.physical == "tied"
    assert "TC019" not in codes(r)
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(d)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_top_level_and_nested_flags_that_disagree_are_a_finding(tmp_path):
    m = tiny_llava(text_tie=False, top=True)
    d = llava_folder(tmp_path, m)
    r = tiecheck.analyze(str(d))
    f = only(r, "TC019")
    assert "config.json text_config.tie_word_embeddings: untied" in f.message
    assert "transformers follows config.json tie_word_embeddings (LlavaConfig)" in f.message
    (row,) = r.declared.ties
    assert row.declared is True
    assert row.conflict is True


def test_nested_config_of_the_wrong_type_is_one_line(tmp_path):
    m = tiny_llava(text_tie=True, top=None)
    d = llava_folder(tmp_path, m)
    raw = json.loads((d / "config.json").read_text())
    raw["text_config"] = "llama"
    (d / "config.json").write_text(json.dumps(raw))
    res = CliRunner().invoke(main, ["inspect", str(d), "--format", "json", "--no-flops"])
    assert res.exit_code == 0, res.output  # the files are still analysed, and the report says why alone
    notes = json.loads(res.output)["source"]["notes"]
    assert any("could not build the architecture from config.json" in n and "text_config" in n for n in notes)


def test_live_model_declared_tied_but_head_changed_in_memory(tmp_path):
    m = llama(tie=True)
    # What a merge that rebuilds the head (peft merge_and_unload of a trained modules_to_save head) leaves.
    m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach() + 1)
    r = tiecheck.analyze(m)
    f = only(r, "TC015")
    assert "memory holds lm_head.weight and model.embed_tokens.weight with different content" in f.message
    (row,) = r.declared.ties
    assert (row.physical, row.stored) == ("separate, different", "no files (in memory)")


def test_megatron_args_declaration(tmp_path):
    emb = torch.randn(32, 8)
    sd = {"embedding.word_embeddings.weight": emb, "decoder.final_layernorm.weight": torch.ones(8)}
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": sd, "args": {"untie_embeddings_and_output_weights": True}}, path)
    r = tiecheck.analyze(str(path))
    (decl,) = r.declared.declarations
    assert decl.value is False
    assert (decl.file, decl.key) == ("model_optim_rng.pt", "args.untie_embeddings_and_output_weights")
    f = only(r, "TC017")
    assert list(f.names) == ["embedding.word_embeddings.weight", "output_layer.weight"]

    torch.save({"model": sd, "args": {"untie_embeddings_and_output_weights": False}}, path)
    r = tiecheck.analyze(str(path))
    assert r.declared.ties[0].stored == "one copy"
    assert "TC017" not in codes(r)


def test_three_layers_show_in_table_and_markdown(tmp_path):
    m = llama(tie=True)
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_model(m, str(path))
    for fmt in ("table", "markdown"):
        res = CliRunner().invoke(main, ["inspect", str(path), "--format", fmt])
        assert "Declared ties (1)" in res.output
        assert "physical" in res.output
        assert "stored" in res.output
        assert "by m.safetensors __metadata__" in res.output
