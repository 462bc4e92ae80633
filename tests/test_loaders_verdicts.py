"""Verdicts from what transformers' own loader does, on the cases that raised false alarms.

Each case is built from transformers' classes with a tiny config, and each verdict is held
against what transformers itself does with the same module or folder (``from_pretrained`` with
``output_loading_info=True``, the Parameters it ties, the values it keeps):

1. a live RoPE model (Llama, Qwen2): ``original_inv_freq`` is a non-persistent copy of
   ``inv_freq``, never saved, never a broken tie;
2. an untied Qwen2-VL / Qwen2.5-VL folder as ``save_pretrained`` writes it: keys mapped as
   ``from_pretrained`` maps them, so ``lm_head.weight`` is neither missing nor unexpected;
3. the T5 v1.1 / mT5 layout (``tie_word_embeddings: false``, a trained head beside ``shared``);
4. Marian with separate vocabularies: the head ties to the decoder's embedding;
5. FLOPs of Whisper (audio features) and NLLB-MoE on meta (``torch.nonzero``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main
from tiecheck.flops import count_flops
from tiecheck.loaders import load_target
from tiecheck.loaders.tensor_facts import build_facts
from tiecheck.testing import assert_no_broken_ties

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from support.hf import EMB as LLAMA_EMB  # noqa: E402 - after the importorskip of transformers, which it imports
from support.hf import HEAD as LLAMA_HEAD  # noqa: E402 - as above
from support.hf import tiny_llama  # noqa: E402 - as above

pytestmark = pytest.mark.usefixtures("quiet_transformers")

# An exception's own text: "AttributeError: 'NoneType' object has no attribute 'shape'".
RAW_EXCEPTION = re.compile(r"\b[A-Z]\w*(Error|Exception)\b:")


def above_info(report) -> list[tuple[str, str, list[str]]]:
    return [(f.code, f.severity, list(f.names)) for f in report.findings if f.severity != "info"]


# -- 1. live RoPE models -----------------------------------------------------------------------

def rope_model(arch: str):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(arch, vocab_size=64, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_fresh_rope_model_raises_nothing_above_info(arch):
    model = rope_model(arch)
    rope = model.model.rotary_emb
    # transformers keeps a clone of inv_freq for dynamic RoPE, out of the state dict: equal, never saved.
    assert torch.equal(rope.inv_freq, rope.original_inv_freq)
    assert "model.rotary_emb.original_inv_freq" not in model.state_dict()
    r = tiecheck.analyze(model)
    assert above_info(r) == []
    assert r.exit_code("warning") == 0
    assert not [d for d in r.untied_duplicates if any("rotary_emb" in n for n in d.names)]
    assert_no_broken_ties(model)


def test_facts_call_non_persistent_exactly_what_the_state_dict_leaves_out():
    model = rope_model("llama")
    facts = build_facts(load_target(model))
    transient = {f.name for f in facts if not f.persistent}
    assert transient == {f.name for f in facts} - set(model.state_dict())
    assert transient == {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}


def test_check_with_fail_on_warning_passes_a_fresh_llama(tmp_path, monkeypatch):
    # The README's CI setup, word for word, on a model built the way users build one.
    (tmp_path / "lm.py").write_text(
        "import transformers\n\n"
        "def build():\n"
        "    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)\n"
        "    return transformers.LlamaForCausalLM(cfg)\n")
    (tmp_path / "pyproject.toml").write_text('[tool.tiecheck]\nfail-on = "warning"\n\n[[tool.tiecheck.targets]]\n'
                                             'target = "lm.py:build"\n')
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["check"])
    assert res.exit_code == 0, res.output


# -- 2. Qwen2-VL / Qwen2.5-VL folders ----------------------------------------------------------

def qwen_vl(cls_name: str, tie: bool, dtype=torch.float32):
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                tie_word_embeddings=tie)
    vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=1, temporal_patch_size=1,
                  in_channels=3, out_hidden_size=32, intermediate_size=32)
    if cls_name.startswith("Qwen2VL"):
        vision.update(embed_dim=16, mlp_ratio=2)
    return cls(config_cls(text_config=text, vision_config=vision, tie_word_embeddings=tie)).to(dtype)


@pytest.mark.parametrize("cls_name", ["Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"])
def test_an_untied_qwen_vl_folder_is_read_as_from_pretrained_reads_it(tmp_path, cls_name):
    model = qwen_vl(cls_name, tie=False)
    model.save_pretrained(tmp_path)
    with safetensors_torch.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= stored  # the legacy layout save_pretrained writes
    loaded, info = type(model).from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # the stored head is what loads

    r = tiecheck.analyze(str(tmp_path))
    arch = r.to_dict()["hf"]["architecture"]
    assert arch["missing"] == sorted(info["missing_keys"])
    assert arch["unexpected"] == sorted(info["unexpected_keys"])
    assert above_info(r) == []
    assert r.exit_code("warning") == 0
    assert not [f for f in r.findings if f.code in ("TC011", "TC012")]
    # The head the report holds is the stored one, under the architecture's name.
    subject = load_target(str(tmp_path))
    assert torch.equal(subject.tensors["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(subject.tensors["model.language_model.embed_tokens.weight"],
                       model.model.language_model.embed_tokens.weight)


def test_a_quantized_head_a_qwen_vl_folder_stores_is_not_called_absent(tmp_path):
    model = qwen_vl("Qwen2VLForConditionalGeneration", tie=True, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    sd = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    w = model.lm_head.weight.detach().float()
    scb = w.abs().amax(dim=1)
    sd |= {"lm_head.weight": torch.round(w * 127 / scb[:, None]).to(torch.int8), "lm_head.SCB": scb,
           "lm_head.weight_format": torch.tensor(0, dtype=torch.uint8)}  # bitsandbytes LLM.int8's layout
    safetensors_torch.save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    r = tiecheck.analyze(str(tmp_path))
    assert [f.code for f in r.findings if f.severity != "info"] == ["TC022"]
    assert not [f for f in r.findings if f.code in ("TC012", "TC010")]
    assert "lm_head.weight" not in r.to_dict()["hf"]["architecture"]["missing"]


# -- 3. T5 v1.1, flan-t5, mT5: a trained head beside shared, tie_word_embeddings written false -------

def t5_folder(path, cls, written: bool):
    """The layout of a T5 v1.1 checkpoint: shared and a head trained apart, the flag as config.json writes it."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(cls.config_class.model_type, vocab_size=64, d_model=16, d_kv=8,
                                                d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
    model = cls(config)
    model.save_pretrained(path)
    head = model.shared.weight.detach().clone() + 0.5
    sd = safetensors_torch.load_file(str(path / "model.safetensors")) | {"lm_head.weight": head}
    safetensors_torch.save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": written}))
    return head


@pytest.mark.parametrize("cls_name", ["T5ForConditionalGeneration", "MT5ForConditionalGeneration"])
def test_a_t5_v1_1_folder_is_untied_by_design(tmp_path, cls_name):
    cls = getattr(transformers, cls_name)
    head = t5_folder(tmp_path, cls, written=False)
    # transformers 5: the config class forces the flag to true, yet the loader keeps both stored copies.
    loaded = cls.from_pretrained(str(tmp_path))
    assert loaded.config.tie_word_embeddings is True
    assert loaded.lm_head.weight is not loaded.shared.weight
    assert torch.equal(loaded.lm_head.weight, head)
    r = tiecheck.analyze(str(tmp_path))
    assert above_info(r) == []
    assert r.exit_code("warning") == 0
    (f,) = [f for f in r.findings if f.code == "TC015"]
    assert f.severity == "info"
    assert "the model loads untied, as stored" in f.message
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--no-flops", "--fail-on", "warning"])
    assert res.exit_code == 0, res.output


def test_a_t5_folder_whose_config_writes_true_is_still_an_error(tmp_path):
    # Written true, two different copies: transformers 5 keeps the stored head, engines that trust the flag serve
    # the embedding instead (transformers 4.57 re-ties it): the loaders disagree.
    cls = transformers.T5ForConditionalGeneration
    head = t5_folder(tmp_path, cls, written=True)
    assert torch.equal(cls.from_pretrained(str(tmp_path)).lm_head.weight, head)
    r = tiecheck.analyze(str(tmp_path))
    assert [(f.code, f.severity) for f in r.findings if f.code == "TC015"] == [("TC015", "error")]
    assert r.exit_code() == 1


def test_fix_leaves_a_t5_v1_1_folder_alone_and_unties_a_written_true_one(tmp_path):
    cls = transformers.T5ForConditionalGeneration
    alone, declared = tmp_path / "v1_1", tmp_path / "written-true"
    alone.mkdir()
    declared.mkdir()
    t5_folder(alone, cls, written=False)
    t5_folder(declared, cls, written=True)
    res = CliRunner().invoke(main, ["fix", str(alone), "-o", str(tmp_path / "out1")])
    assert res.exit_code == 0, res.output
    assert "nothing to fix" in res.output, res.output
    assert "written to" in res.output, res.output
    # The encoder-decoder's logits are compared too (decoder ids given), and equal.
    assert "pass  transformers logits" in res.output
    res = CliRunner().invoke(main, ["fix", str(declared), "-o", str(tmp_path / "out2")])
    assert res.exit_code == 0, res.output
    assert "declare-untied" in res.output, res.output
    assert "pass  findings answered" in res.output
    assert "written to" in res.output
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["tie_word_embeddings"] is False


# -- 4. Marian with separate vocabularies ----------------------------------------------------------

def marian():
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(vocab_size=64, decoder_vocab_size=48, share_encoder_decoder_embeddings=False,
                                    d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                    max_position_embeddings=32, pad_token_id=1, decoder_start_token_id=1)
    return transformers.MarianMTModel(cfg)


def test_marian_with_separate_vocabularies_holds_the_flag_against_the_decoder_embedding(tmp_path):
    model = marian()
    # What transformers does: the head is the decoder's embedding, not get_input_embeddings() (the encoder's).
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.get_input_embeddings() is model.model.encoder.embed_tokens
    model.save_pretrained(tmp_path)
    for target in (model, str(tmp_path)):
        r = tiecheck.analyze(target)
        assert above_info(r) == []
        assert not [f for f in r.findings if f.code == "TC011"]
        (row,) = [t for t in r.declared.ties if "lm_head.weight" in t.names]
        assert list(row.names) == ["lm_head.weight", "model.decoder.embed_tokens.weight"]
        assert row.declared
        assert row.physical == "tied"


# -- 5. FLOPs: a sentence, never an exception's text ---------------------------------------------------

def counted_on_meta_as_on_cpu(cls, cfg, seq_len: int, note: str, method: str) -> None:
    """The meta trace (or, for a small model, the CPU trace with zero-filled weights: ``method``) counts, with
    ``note`` among its notes, exactly what the real forward on the CPU counts."""
    torch.manual_seed(0)
    real = cls(cfg).eval()
    with torch.device("meta"):
        meta = cls(cfg)
    on_meta, on_cpu = count_flops(meta, seq_len=seq_len), count_flops(real, seq_len=seq_len, device="cpu")
    assert on_meta.available, on_meta.reason
    assert on_meta.method == method, on_meta.reason
    assert note in on_meta.notes
    assert on_meta.forward == on_cpu.forward
    assert on_meta.by_part == on_cpu.by_part


def test_whisper_flops_are_counted_with_the_audio_features_its_forward_reads(flops_path):
    cfg = transformers.WhisperConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_source_positions=50, max_target_positions=32,
                                     num_mel_bins=8, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                     decoder_start_token_id=3)
    # The strided front-end convolution runs as unfold + einsum on meta.
    counted_on_meta_as_on_cpu(transformers.WhisperForConditionalGeneration, cfg, 16,
                              "synthesized input_features [1, 8, 100] of zeros: the forward needs it", flops_path)


def test_a_vision_encoder_decoder_is_counted_on_meta_with_synthesized_images(flops_path):
    vit = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=32, patch_size=8)
    bert = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, is_decoder=True, add_cross_attention=True)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, bert, decoder_start_token_id=1,
                                                                              pad_token_id=0)
    # The patch embedding's conv2d runs as unfold + einsum on meta.
    counted_on_meta_as_on_cpu(transformers.VisionEncoderDecoderModel, cfg, 8,
                              "synthesized pixel_values [1, 3, 32, 32] of zeros: the forward needs it", flops_path)


def test_nllb_moe_on_meta_says_why_in_a_sentence(flops_path):
    """Small as it is, its experts are not traced on the CPU: they route by value and drop what exceeds
    their capacity, so zero-filled weights would decide the count."""
    cfg = transformers.NllbMoeConfig(vocab_size=128, d_model=16, encoder_layers=4, decoder_layers=4,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, num_experts=4, expert_capacity=4, max_position_embeddings=64,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    with torch.device("meta"):
        model = transformers.NllbMoeForConditionalGeneration(cfg)
    r = count_flops(model, seq_len=16)
    assert not r.available
    assert r.reason.startswith("the forward could not be traced on the meta device: the forward calls torch.nonzero, "
                               "whose output size depends on the values")
    assert not RAW_EXCEPTION.search(r.reason)
    assert r.errors
    assert r.errors[0].startswith("meta: NotImplementedError: ")


def test_a_forward_that_needs_images_tiecheck_cannot_shape_gives_a_sentence():
    # IDEFICS reads a stack of images per example; the (batch, channels, h, w) tiecheck synthesizes is not it.
    model = transformers.IdeficsForVisionText2Text._from_config(transformers.AutoConfig.for_model(
        "idefics", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        vision_config={"embed_dim": 16, "image_size": 8, "patch_size": 4, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 32},
        perceiver_config={"qk_layer_norms_perceiver": False, "resampler_n_latents": 2, "resampler_depth": 1,
                          "resampler_n_heads": 2, "resampler_head_dim": 8}))
    d = tiecheck.analyze(model, flops=True, seq_len=8, duplicates=False).flops
    assert not d.available
    assert not RAW_EXCEPTION.search(d.reason)
    assert "its forward needs pixel_values (images)" in d.reason
    assert "inputs=" in d.reason
    assert d.errors


# -- hints that follow the verdict ---------------------------------------------------------------------

def test_a_copied_head_the_config_keeps_untied_is_not_sent_to_tie_weights():
    model = tiny_llama(tie=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    assert isinstance(model, transformers.PreTrainedModel)
    model.tie_weights()  # what the old hint offered: with tie_word_embeddings=False it ties nothing
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    (f,) = [f for f in tiecheck.analyze(model).findings if f.code == "TC005"]
    assert f.severity == "warning"
    assert list(f.names) == [LLAMA_HEAD, LLAMA_EMB]
    assert "tie_weights()` leaves them apart" in f.hint
    assert "set tie_word_embeddings=true" in f.hint


# -- found by the sweep (benchmarks/sweep_precision.py) ------------------------------------------------

def test_a_cloned_embedding_still_tied_to_the_head_under_another_name_is_a_broken_tie(tmp_path):
    # FSMT with one vocabulary ties the encoder's embedding, the decoder's and the output projection into one
    # tensor. A clone of the decoder's embedding in a bare state dict: its copy's other names include the head.
    cfg = transformers.FSMTConfig(src_vocab_size=64, tgt_vocab_size=64, d_model=16, encoder_layers=1,
                                  decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                                  tie_word_embeddings=True, langs=["en", "de"])
    torch.manual_seed(0)
    model = transformers.FSMTForConditionalGeneration(cfg)
    dec = model.model.decoder
    assert dec.embed_tokens.weight is dec.output_projection.weight is model.model.encoder.embed_tokens.weight
    dec.embed_tokens.weight = torch.nn.Parameter(dec.embed_tokens.weight.detach().clone())
    path = tmp_path / "fsmt.pt"
    torch.save(model.state_dict(), path)
    (f,) = [f for f in tiecheck.analyze(str(path)).findings if f.severity != "info"]
    assert (f.code, f.severity) == ("TC005", "error")
    assert "model.decoder.embed_tokens.weight" in f.names
    assert "are an input embedding and its output projection, so this is a broken tie" in f.message


TINY = {  # transformers classes whose embedding or head a bare state dict names in its own way
    "CTRLLMHeadModel": ("ctrl", dict(vocab_size=64, n_embd=16, n_layer=1, n_head=2, dff=32)),
    "OpenAIGPTLMHeadModel": ("openai-gpt", dict(vocab_size=64, n_embd=16, n_layer=1, n_head=2)),
    "XLNetLMHeadModel": ("xlnet", dict(vocab_size=64, d_model=16, n_layer=1, n_head=2, d_inner=32)),
    "DistilBertForMaskedLM": ("distilbert", dict(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32)),
    "ElectraForMaskedLM": ("electra", dict(vocab_size=64, embedding_size=16, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32)),
    "FlaubertWithLMHeadModel": ("flaubert", dict(vocab_size=64, emb_dim=16, n_layers=1, n_heads=2)),
}


@pytest.mark.parametrize("cls_name", list(TINY))
def test_a_cloned_head_in_a_bare_state_dict_is_known_by_transformers_own_names(tmp_path, cls_name):
    model_type, kwargs = TINY[cls_name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(transformers.AutoConfig.for_model(model_type, tie_word_embeddings=True,
                                                                              **kwargs))
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is emb.weight  # transformers ties them
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())  # what load_state_dict(assign=True) leaves
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    names = {id(m): n for n, m in model.named_modules()}
    pair = sorted([f"{names[id(head)]}.weight", f"{names[id(emb)]}.weight"])
    r = tiecheck.analyze(str(path))
    assert [(f.code, f.severity, list(f.names)) for f in r.findings if f.severity != "info"] == \
        [("TC005", "error", pair)]
