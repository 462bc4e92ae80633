"""A ``tie_word_embeddings`` in config.json that is not true or false, held against the files without an
architecture (``config_vs_files``) as transformers reads it: the folder's config class is asked. transformers
5 refuses such a value in most classes (the folder does not load, so there is nothing to warn about), while a
class that declares no such field keeps it and ties by its truth (``NomicBertConfig``)."""

from __future__ import annotations

import json

import pytest
import torch

import tiecheck
from tiecheck.loaders.hf_reconcile import config_tie, config_vs_files

from support.hf import EMB, HEAD, tiny_llama

transformers = pytest.importorskip("transformers")
errors = pytest.importorskip("huggingface_hub.errors")

NOMIC = {"model_type": "nomic_bert", "architectures": ["NomicBertForMaskedLM"], "vocab_size": 32,
         "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
         "max_position_embeddings": 16}
N_EMB, N_HEAD = "nomic_bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"


def test_a_flag_of_1_that_llama_refuses_is_no_tc011(tmp_path):
    """LlamaConfig refuses ``1`` (the folder does not load): no TC011 for the head the files store apart."""
    tiny_llama(tie=False).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.StrictDataclassFieldValidationError, match="tie_word_embeddings"):
        transformers.AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(errors.StrictDataclassFieldValidationError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    model = tiny_llama(tie=False)
    files = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(files[EMB], files[HEAD])  # stored apart, so a tie read from the flag would be TC011
    assert config_tie(cfg) is None
    assert config_vs_files(files, cfg) == []
    r = tiecheck.analyze(str(tmp_path))  # no architecture: the files alone, as config_vs_files reads them
    assert not [f for f in r.findings if f.code == "TC011"]


def _nomic(tie, head_offset: float | None):
    """A NomicBert masked LM built from ``tie``, its files with the head stored ``head_offset`` away from the
    embedding (None: no head stored); the model tells whether transformers ties."""
    torch.manual_seed(0)
    cfg = {**NOMIC, "tie_word_embeddings": tie}
    model = transformers.NomicBertForMaskedLM(transformers.CONFIG_MAPPING["nomic_bert"].from_dict(dict(cfg)))
    files = {k: v.clone() for k, v in model.state_dict().items()}
    files.pop(N_HEAD)
    if head_offset is not None:
        files[N_HEAD] = files[N_EMB] + head_offset
    return model, cfg, files


def test_a_flag_of_1_that_nomic_bert_keeps_ties_and_is_held_against_the_files():
    model, cfg, files = _nomic(1, 1.0)
    assert model.config.tie_word_embeddings == 1  # kept as written, not made a bool
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert config_tie(cfg) is True
    (f,) = config_vs_files(files, cfg)
    assert (f.code, sorted(f.names)) == ("TC011", sorted([N_EMB, N_HEAD]))
    assert f.message.startswith("config.json says tie_word_embeddings=1 (which transformers reads as true), but the "
                                f"files store {N_EMB} and {N_HEAD} with different content")
    assert config_vs_files(_nomic(1, 0.0)[2], cfg) == []  # stored equal: the tie holds


def test_a_flag_of_0_that_nomic_bert_keeps_unties_and_a_missing_head_is_tc011():
    model, cfg, files = _nomic(0, None)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert config_tie(cfg) is False
    (f,) = config_vs_files(files, cfg)
    assert (f.code, list(f.names)) == ("TC011", [N_EMB])
    assert f.message.startswith("config.json says tie_word_embeddings=0 (which transformers reads as false) for "
                                "NomicBertForMaskedLM, but the files hold no output projection")
    assert config_vs_files(_nomic(0, 1.0)[2], cfg) == []  # untied and stored apart: as the flag says


def test_a_flag_string_is_read_by_its_truth_as_transformers_reads_it():
    """``"false"`` is a non-empty string: NomicBertConfig keeps it and transformers ties."""
    model, cfg, files = _nomic("false", 1.0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    (f,) = config_vs_files(files, cfg)
    assert 'tie_word_embeddings="false" (which transformers reads as true)' in f.message


def test_t5_makes_any_flag_true():
    assert transformers.T5Config.from_dict({"tie_word_embeddings": 0}).tie_word_embeddings is True
    assert config_tie({"model_type": "t5", "tie_word_embeddings": 0}) is True


def test_a_bool_is_taken_as_written_and_no_class_to_ask_is_no_verdict(monkeypatch):
    assert config_tie({"model_type": "llama", "tie_word_embeddings": False}) is False
    # flan-t5's false as written (what engines other than transformers read), though T5Config makes it true
    assert config_tie({"model_type": "t5", "tie_word_embeddings": False}) is False
    assert config_tie({"model_type": "llama"}) is None
    assert config_tie({"tie_word_embeddings": 1}) is None  # no model_type: no class
    assert config_tie({"model_type": "no-such-model", "tie_word_embeddings": 1}) is None
    assert config_tie({"model_type": ["nomic_bert"], "tie_word_embeddings": 1}) is None  # not a name
    monkeypatch.setitem(__import__("sys").modules, "transformers.models.auto.configuration_auto", None)
    assert config_tie({**NOMIC, "tie_word_embeddings": 1}) is None  # transformers missing: cannot be asked


def test_the_config_asked_is_not_changed():
    """InklingMMConfig writes its defaults into the ``text_config`` dict it is given: config.json as read
    is still what the declared layer reads after."""
    cfg = {"model_type": "inkling_mm_model", "tie_word_embeddings": 1, "text_config": {"vocab_size": 32}}
    given = json.loads(json.dumps(cfg))
    transformers.CONFIG_MAPPING["inkling_mm_model"].from_dict(given)
    assert given != cfg  # the class rewrites what it is handed
    assert config_tie(cfg) is True
    assert cfg == {"model_type": "inkling_mm_model", "tie_word_embeddings": 1, "text_config": {"vocab_size": 32}}
