"""What the reconciliation of a Hugging Face folder says besides its tie groups (``loaders/hf_reconcile.py``):
the architecture's ties in words, the head the files leave out of an untied model, the tensors transformers
ignores or builds from others, the redundant bytes of a tie stored as one tensor, and the file spans the
content pass reads under the architecture's names. Each folder is one transformers writes or loads, and
transformers is asked what it does with it."""

from __future__ import annotations

import json

import pytest
import torch

import tiecheck
from tiecheck.loaders import load_target
from tiecheck.loaders.formats.safetensors_files import load_safetensors_file
from tiecheck.loaders.hf_architecture import build_architecture
from tiecheck.loaders.hf_reconcile import architecture_ties, reconcile

from support.hf import EMB, HEAD, tiny_llama

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("quiet_transformers")


def test_the_architecture_ties_in_words():
    assert architecture_ties([]) == "it ties no names"
    assert architecture_ties([("a", "b")]) == "it ties a = b"
    three = [("a", "b"), ("c", "d"), ("e", "f", "g")]
    assert architecture_ties(three) == "it ties a = b; c = d; e = f = g"
    assert architecture_ties([*three, ("h", "i")]) == "it ties a = b; c = d; e = f = g and 1 more"
    assert architecture_ties([*three, ("h", "i"), ("j", "k")]) == "it ties a = b; c = d; e = f = g and 2 more"


def test_an_untied_model_says_it_ties_no_names(tmp_path):
    tiny_llama(tie=False).save_pretrained(tmp_path)
    (note,) = [n for n in tiecheck.analyze(str(tmp_path), flops=False).source.notes if n.startswith("architecture ")]
    assert note.endswith(": it ties no names")


def test_a_tie_torch_saved_as_one_tensor_has_no_redundant_bytes(tmp_path):
    """``torch.save(model.state_dict())`` of a tied model writes the embedding and the head as one storage:
    nothing is stored twice, and transformers loads it tied."""
    model = tiny_llama(tie=True)
    model.config.save_pretrained(tmp_path)
    sd = model.state_dict()
    assert sd[EMB].untyped_storage().data_ptr() == sd[HEAD].untyped_storage().data_ptr()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    r = tiecheck.analyze(str(tmp_path), flops=False)
    assert not [n for n in r.source.notes if "redundant bytes" in n]
    assert [list(g.names) for g in r.tie_groups] == [sorted([EMB, HEAD])]


@pytest.fixture
def untied_without_head(tmp_path):
    """An untied Llama saved by save_pretrained, its files rewritten without the head."""
    tiny_llama(tie=False).save_pretrained(tmp_path)
    files = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    del files[HEAD]
    safetensors_torch.save_file(files, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def test_an_untied_architecture_whose_files_hold_no_head_is_tc011(untied_without_head):
    """transformers initialises the head at random (a missing key, not tied to the embedding): TC011 from the
    reconciliation itself, which the report's declared layer replaces (called here directly)."""
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(untied_without_head, output_loading_info=True)
    assert HEAD in info["missing_keys"]
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    cfg = json.loads((untied_without_head / "config.json").read_text())
    arch, _ = build_architecture(untied_without_head, cfg)
    files = safetensors_torch.load_file(str(untied_without_head / "model.safetensors"))
    _, findings, _, facts, _ = reconcile(files, arch, False)
    (f,) = [f for f in findings if f.code == "TC011"]
    assert sorted(f.names) == sorted([HEAD, EMB])
    assert f.message.startswith(f"the files hold no {HEAD} and config.json says tie_word_embeddings=false: "
                                "transformers initialises the output projection randomly on load")
    assert facts["missing"] == [HEAD]
    (g,) = [f for f in reconcile(files, arch, None)[1] if f.code == "TC011"]
    assert g.message.startswith(f"the files hold no {HEAD} and LlamaForCausalLM does not tie it: ")
    # The head stored: nothing missing, no TC011.
    files[HEAD] = torch.zeros_like(files[EMB])
    assert not [f for f in reconcile(files, arch, False)[1] if f.code == "TC011"]


def test_a_tensor_the_architecture_does_not_name_is_said_ignored_and_keeps_its_span(tmp_path):
    tiny_llama(tie=False).save_pretrained(tmp_path)
    files = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    files["model.extra.weight"] = torch.ones(4)
    safetensors_torch.save_file(files, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == {"model.extra.weight"}
    r = tiecheck.analyze(str(tmp_path), flops=False)
    assert ("1 tensor(s) in the files are not in LlamaForCausalLM (e.g. model.extra.weight); transformers ignores "
            "them on load") in r.source.notes
    subject = load_target(str(tmp_path))
    spans = load_safetensors_file(tmp_path / "model.safetensors", restore_aliases=False).file_spans
    assert subject.file_spans["model.extra.weight"] == spans["model.extra.weight"]


def test_the_architecture_names_carry_the_file_spans_of_the_keys_they_load(tmp_path):
    """The content pass reads a tensor's bytes through its file span (a remote file's only way): each name
    of the architecture carries the span of the file key transformers loads into it, a tied name the
    files leave out that of the name it is tied to."""
    tiny_llama(tie=True).save_pretrained(tmp_path)  # the head left out
    subject = load_target(str(tmp_path))
    spans = load_safetensors_file(tmp_path / "model.safetensors", restore_aliases=False).file_spans
    assert HEAD not in spans
    assert subject.file_spans[HEAD] == spans[EMB]
    assert {n: subject.file_spans[n] for n in spans} == spans
    assert len(subject.tensors) == len(list(subject.tensors)) == len(spans) + 1


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A Qwen3-MoE saved one tensor per expert, which transformers fuses on load."""
    pytest.importorskip("transformers.conversion_mapping")  # transformers 5: the loader's key mapping
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=2, num_experts_per_tok=1, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("moe") / "qwen3-moe"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def test_the_merged_note_names_the_first_key_transformers_merges(moe_folder):
    first = "model.layers.0.mlp.experts.0.down_proj.weight"  # transformers' own order (dot_natural_key)
    r = tiecheck.analyze(str(moe_folder), flops=False)
    (note,) = [n for n in r.source.notes if "on load into" in n]
    assert f"(e.g. {first} -> model.layers.0.mlp.experts.down_proj)" in note
    assert " are merged on load into " in note
    subject = load_target(str(moe_folder))
    spans = load_safetensors_file(moe_folder / "model.safetensors", restore_aliases=False).file_spans
    assert subject.file_spans[first] == spans[first]  # a piece is analysed as stored, under its file name


def test_a_tie_torch_saved_as_one_tensor_is_no_tc010(tmp_path):
    """The same memory under both names is equal content, whatever the values (NaN included)."""
    model = tiny_llama(tie=True)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("nan")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    subject = load_target(str(tmp_path))
    assert not [f for f in subject.loader_findings if f.code in ("TC010", "TC011", "TC012")]


def test_a_state_dict_of_meta_tensors_is_not_compared(tmp_path):
    """``torch.save`` of a model built on the meta device writes tensors without data: the tied names
    stored twice cannot be compared, so neither TC010 nor a claim of equal content and redundant bytes."""
    with torch.device("meta"):
        model = tiny_llama(tie=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True  # the class ties them; the files hold two tensors without data
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    subject = load_target(str(tmp_path))
    assert subject.tensors[EMB].device.type == "meta"
    assert not [f for f in subject.loader_findings if f.code == "TC010"]
    assert not [n for n in subject.source.notes if "redundant bytes" in n]


def test_a_head_without_data_beside_an_embedding_with_data_is_not_compared(tmp_path):
    """A state dict whose head alone is a meta tensor (a model materialised in part): nothing to compare."""
    model = tiny_llama(tie=False)
    model.config.tie_word_embeddings = True
    model.config.save_pretrained(tmp_path)
    sd = dict(model.state_dict())
    sd[HEAD] = torch.empty_like(sd[HEAD], device="meta")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    saved = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert (saved[EMB].device.type, saved[HEAD].device.type) == ("cpu", "meta")
    subject = load_target(str(tmp_path))
    assert not [f for f in subject.loader_findings if f.code == "TC010"]
    assert not [n for n in subject.source.notes if "redundant bytes" in n]


def test_a_class_whose_tie_mapping_names_no_head_is_no_tc011(tmp_path):
    """CpmAnt's tie mapping ties nothing to its head: transformers loads it as stored whatever the flag says,
    so a config saying true is not held against the built model."""
    cfg = transformers.CpmAntConfig(vocab_size=32, hidden_size=8, num_attention_heads=2, dim_head=4, dim_ff=16,
                                    num_hidden_layers=1, prompt_length=2, prompt_types=2, segment_types=2,
                                    tie_word_embeddings=True)
    model = transformers.CpmAntForCausalLM(cfg)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    arch, _ = build_architecture(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    assert arch.output_embedding == HEAD
    files = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert not [f for f in reconcile(files, arch, True)[1] if f.code == "TC011"]


def _unprefixed(folder, keys) -> None:
    """Rewrites the folder's files with ``keys`` saved without the base model's prefix ``model.``."""
    files = safetensors_torch.load_file(str(folder / "model.safetensors"))
    files = {k.removeprefix("model.") if k in keys else k: v for k, v in files.items()}
    safetensors_torch.save_file(files, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("how_many", [1, 3])
def test_keys_saved_without_the_base_prefix_are_matched_and_counted(tmp_path, how_many):
    """transformers adds the base model's prefix key by key; the note counts the keys it added it to."""
    tiny_llama(tie=False).save_pretrained(tmp_path)
    keys = ["model.norm.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"][:how_many]
    _unprefixed(tmp_path, keys)
    _, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    notes = load_target(str(tmp_path)).source.notes
    keys_text = "1 file key" if how_many == 1 else f"{how_many} file keys"
    assert f"{keys_text} matched to the architecture after added prefix 'model.'" in notes


def test_the_notes_name_three_of_the_tensors_missing_or_ignored(tmp_path):
    model = tiny_llama(tie=False)
    model.save_pretrained(tmp_path)
    files = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    gone = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    for k in gone:
        del files[k]
    extra = [f"model.extra{i}.weight" for i in range(4)]
    files.update({k: torch.ones(2) for k in extra})
    safetensors_torch.save_file(files, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set(gone)
    assert info["unexpected_keys"] == set(extra)
    notes = load_target(str(tmp_path)).source.notes
    first = [k for k in model.state_dict() if k in gone][:3]  # in the architecture's order
    assert ("4 architecture tensor(s) are absent from the files and tied to nothing stored, so transformers "
            f"initialises them on load (e.g. {', '.join(first)})") in notes
    assert (f"4 tensor(s) in the files are not in LlamaForCausalLM (e.g. {', '.join(extra[:3])}); transformers "
            "ignores them on load") in notes


def test_a_fused_tensor_split_on_load_fills_each_target(tmp_path):
    """GTE's files store a fused qkv (split in three on load) and a fused up-gate (split in two)."""
    cfg = transformers.CONFIG_MAPPING["gte"].from_dict(
        {"vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 16, "max_position_embeddings": 16})
    model = transformers.AutoModel.from_config(cfg)
    model.save_pretrained(tmp_path)
    with safetensors_torch.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert {"encoder.layer.0.attention.qkv_proj.weight", "encoder.layer.0.mlp.up_gate_proj.weight"} <= stored
    _, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    arch = tiecheck.analyze(str(tmp_path), flops=False)
    facts = arch.to_dict()["hf"]["architecture"]
    assert facts["missing"] == []
    fused = ["encoder.layer.0.mlp.up_gate_proj.weight"]
    assert {k: v for k, v in facts["converted"].items() if ".mlp." in k} == {
        "layers.0.mlp.up_proj.weight": fused, "layers.0.mlp.gate_proj.weight": fused}
    qkv = ["encoder.layer.0.attention.qkv_proj.weight"]
    assert {k: v for k, v in facts["converted"].items() if k.endswith("_proj.weight") and "self_attn" in k} == {
        f"layers.0.self_attn.{p}_proj.weight": qkv for p in "qkv"}
    (note,) = [n for n in arch.source.notes if "on load into" in n]
    assert note.startswith("3 tensor(s) in the files are split on load into 8 tensor(s) of GteModel by "
                           "transformers' conversion mapping (e.g. encoder.layer.0.attention.qkv_proj.bias -> "
                           "layers.0.self_attn.q_proj.bias, layers.0.self_attn.k_proj.bias, "
                           "layers.0.self_attn.v_proj.bias)")
