"""Hugging Face folders whose keys transformers 5 renames or converts while it loads them.

A mixture-of-experts model is saved one tensor per expert and built with one fused tensor per
layer; a legacy checkpoint names LayerNorm weights ``gamma``/``beta``. Neither is a tensor
transformers ignores, nor an architecture tensor it initialises: the report must say what the
loader does with them.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main
from tiecheck.loaders import hf_architecture, hf_reconcile
from tiecheck.loaders.formats.safetensors_files import MappedTensors

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("transformers.conversion_mapping")  # transformers 5: the loader's key mapping

pytestmark = pytest.mark.usefixtures("quiet_transformers")

EXPERTS, LAYERS = 4, 2


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=EXPERTS, num_experts_per_tok=2, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("moe") / "qwen3-moe"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def per_expert(layer: int) -> list[str]:
    return sorted(f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"
                  for e in range(EXPERTS) for p in ("gate_proj", "up_proj", "down_proj"))


def test_per_expert_tensors_are_merged_on_load_not_ignored(moe_folder):
    with safetensors_torch.safe_open(str(moe_folder / "model.safetensors"), "pt") as f:
        assert set(per_expert(0)) <= set(f.keys())  # what save_pretrained writes
    r = tiecheck.analyze(str(moe_folder), flops=False)
    arch = r.to_dict()["hf"]["architecture"]
    assert arch["unexpected"] == []
    assert arch["missing"] == []
    converted = arch["converted"]
    assert sorted(converted) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in range(LAYERS)
                                       for p in ("down_proj", "gate_up_proj"))
    assert converted["model.layers.1.mlp.experts.down_proj"] == [
        f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(EXPERTS)]
    assert converted["model.layers.0.mlp.experts.gate_up_proj"] == sorted(
        f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in range(EXPERTS) for p in ("gate", "up"))
    notes = list(r.source.notes)
    assert not any("ignores them on load" in n or "initialises them on load" in n for n in notes)
    (merged,) = [n for n in notes if "merged on load" in n]
    assert merged.startswith(f"{LAYERS * EXPERTS * 3} tensor(s) in the files are merged on load into {LAYERS * 2} "
                             "tensor(s) of Qwen3MoeForCausalLM by transformers' conversion mapping")
    # The pieces are analysed as stored; the tie the architecture declares is still found.
    names = {t.name for t in r.tensors}
    assert set(per_expert(1)) <= names
    assert "model.layers.1.mlp.experts.down_proj" not in names
    assert [list(g.names) for g in r.tie_groups] == [["lm_head.weight", "model.embed_tokens.weight"]]


def test_a_key_no_rule_reaches_is_still_ignored(moe_folder, tmp_path):
    d = tmp_path / "extra"
    d.mkdir()
    (d / "config.json").write_text((moe_folder / "config.json").read_text())
    tensors = safetensors_torch.load_file(str(moe_folder / "model.safetensors"))
    tensors["model.layers.0.mlp.experts.0.stray.weight"] = tensors["model.norm.weight"].clone()
    safetensors_torch.save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    arch = tiecheck.analyze(str(d), flops=False).to_dict()["hf"]["architecture"]
    assert arch["unexpected"] == ["model.layers.0.mlp.experts.0.stray.weight"]
    assert len(arch["converted"]) == LAYERS * 2


def test_an_expert_missing_from_the_files_leaves_its_fused_tensor_built_from_the_rest(moe_folder, tmp_path):
    # The report lists exactly the pieces the files hold for each fused tensor.
    d = tmp_path / "gap"
    d.mkdir()
    (d / "config.json").write_text((moe_folder / "config.json").read_text())
    tensors = safetensors_torch.load_file(str(moe_folder / "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.3.down_proj.weight"]
    safetensors_torch.save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    converted = tiecheck.analyze(str(d), flops=False).to_dict()["hf"]["architecture"]["converted"]
    assert converted["model.layers.0.mlp.experts.down_proj"] == [
        f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(3)]


@pytest.fixture(scope="module")
def legacy_bert(tmp_path_factory):
    """A tiny BertForMaskedLM saved with the LayerNorm names of old checkpoints (gamma, beta)."""
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertForMaskedLM(cfg)
    d = tmp_path_factory.mktemp("bert") / "legacy"
    model.save_pretrained(d)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
          v.detach().clone().contiguous() for k, v in model.state_dict().items()
          if k != "cls.predictions.decoder.weight"}  # tied to the word embeddings: save_pretrained drops it too
    safetensors_torch.save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_legacy_names_are_renamed_as_transformers_renames_them(legacy_bert):
    r = tiecheck.analyze(str(legacy_bert), flops=False)
    arch = r.to_dict()["hf"]["architecture"]
    assert arch["unexpected"] == []
    assert arch["missing"] == []
    assert arch["converted"] == {}
    with safetensors_torch.safe_open(str(legacy_bert / "model.safetensors"), "pt") as f:
        legacy = [k for k in f.keys() if k.endswith((".gamma", ".beta"))]  # noqa: SIM118 - safe_open has keys(), no __iter__
    assert len(legacy) == 8  # four LayerNorms: embeddings, attention output, output, the MLM transform
    (note,) = [n for n in r.source.notes if "load-time renaming" in n]
    assert note.startswith("8 file keys matched to the architecture after transformers' load-time renaming (e.g. ")
    names = {t.name for t in r.tensors}
    assert "bert.embeddings.LayerNorm.weight" in names
    assert "bert.embeddings.LayerNorm.gamma" not in names
    assert ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"] in \
        [list(g.names) for g in r.tie_groups]


def test_the_cli_says_it_in_one_note(moe_folder):
    res = CliRunner().invoke(main, ["inspect", str(moe_folder), "--no-flops", "--format", "json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["hf"]["architecture"]["converted"]
    assert sum("merged on load" in n for n in report["source"]["notes"]) == 1


def test_a_current_name_beside_its_legacy_one_is_loaded_as_from_pretrained_loads_it(legacy_bert, tmp_path):
    d = tmp_path / "both"
    d.mkdir()
    (d / "config.json").write_text((legacy_bert / "config.json").read_text())
    tensors = safetensors_torch.load_file(str(legacy_bert / "model.safetensors"))
    legacy = tensors["bert.embeddings.LayerNorm.gamma"]
    tensors["bert.embeddings.LayerNorm.weight"] = legacy.clone() + 1
    safetensors_torch.save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    # The loader itself: the first key in its order (the legacy one) fills the weight, and neither is reported.
    loaded, info = transformers.BertForMaskedLM.from_pretrained(str(d), output_loading_info=True)
    assert not info["unexpected_keys"]
    assert not info["missing_keys"]
    assert loaded.bert.embeddings.LayerNorm.weight.detach().equal(legacy)
    r = tiecheck.analyze(str(d), flops=False)
    arch = r.to_dict()["hf"]["architecture"]
    assert arch["unexpected"] == []
    assert arch["missing"] == []
    (note,) = [n for n in r.source.notes if "fills first" in n]
    assert note.startswith("1 file key lands on an architecture key another file key fills first (e.g. "
                           "bert.embeddings.LayerNorm.weight -> bert.embeddings.LayerNorm.weight, filled by "
                           "bert.embeddings.LayerNorm.gamma)")
    # The architecture's weight is the tensor transformers loads: the legacy one.
    subject = tiecheck.loaders.load_target(str(d))
    assert subject.tensors["bert.embeddings.LayerNorm.weight"].equal(legacy)


def test_two_renamed_keys_never_land_on_one_name(monkeypatch):
    arch = hf_architecture.Architecture(name="M", keys=["a.weight", "b.weight"], groups=[], declared={}, prefix="",
                           tie_word_embeddings=None, input_embedding=None, output_embedding=None, version="5")
    monkeypatch.setattr(hf_reconcile, "load_time_keys", lambda keys, _arch: (
        {"a.gamma": "a.weight", "old.a": "a.weight", "b.gamma": "b.weight"}, {}))
    km = hf_reconcile.key_map(["a.gamma", "old.a", "b.gamma"], arch)
    assert km.to_arch == {"a.gamma": "a.weight", "b.gamma": "b.weight"}
    assert km.shadowed == {"old.a": "a.weight"}
    assert km.notes[0] == ("2 file keys matched to the architecture after transformers' load-time renaming "
                           "(e.g. a.gamma -> a.weight)")


def test_the_files_facts_are_built_once_per_folder(moe_folder, monkeypatch):
    # The reconciliation, the declared layer and the analyses all read the files' facts: one pass over
    # the header, not one per reader (a 100,000-tensor folder pays each pass in full).
    calls = []
    original = MappedTensors.facts
    monkeypatch.setattr(MappedTensors, "facts", lambda self: calls.append(1) or original(self))
    tiecheck.analyze(str(moe_folder), flops=False)
    assert len(calls) == 1
