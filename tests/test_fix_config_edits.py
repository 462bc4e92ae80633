"""fix's config.json edits, held against what transformers' config class makes of them.

fix declares a folder's tie by writing ``tie_word_embeddings``. transformers 5's T5Config sets the
flag true whatever config.json writes, BLT's configs set it false, and T5Config derives
``scale_decoder_outputs`` from the written flag where config.json leaves that key out (flan-t5's
config.json writes false and has no such key). Each test asks the class first, then holds fix to it:
an edit the class would not take, or one that changes something else, is refused before anything
is written.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tiecheck.cli import main
from tiecheck.errors import TiecheckError
from tiecheck.loaders.hf_config_edits import _get_path, edit_refusal
from tiecheck.repair import fix

from support.hf import tiny_t5_folder

FLAN = {"tie_word_embeddings": False, "scale_decoder_outputs": None}  # config.json as flan-t5's reads


def _config(folder, cfg: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _with_own_head(folder, seed: int = 1):
    """The folder's weights with an lm_head.weight of its own (T5 v1.1, flan-t5)."""
    sd = load_file(folder / "model.safetensors")
    torch.manual_seed(seed)
    save_file({**sd, "lm_head.weight": torch.randn(32, 8)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def test_t5config_sets_the_flag_itself_and_an_untie_is_refused_before_writing(tmp_path):
    folder = tiny_t5_folder(tmp_path / "t5")
    # What transformers does: the written false is not read back, and the model ties as before.
    written = json.loads((folder / "config.json").read_text())
    assert transformers.T5Config.from_dict({**written, "tie_word_embeddings": False}).tie_word_embeddings is True
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["fix", str(folder), "-o", str(out),
                                    "--untie", "encoder.embed_tokens.weight,shared.weight"])
    assert res.exit_code == 2, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.strip()]
    assert line == ("tiecheck: error: --untie encoder.embed_tokens.weight,shared.weight: T5Config (transformers "
                    f"{transformers.__version__}) sets tie_word_embeddings to true itself when config.json writes "
                    "false, so the copy would load as this folder does")
    assert not out.exists()


def test_a_t5_head_of_its_own_is_declared_untied_only_where_the_scale_is_pinned(tmp_path):
    # A head stored apart under T5's declared tie (TC015). transformers 5 keeps both stored copies whatever
    # T5Config makes of the flag, so fix writes false for config.json's other readers (transformers 4, engines)
    # where that changes nothing else: a config.json transformers 5 wrote pins scale_decoder_outputs.
    pinned = _with_own_head(tiny_t5_folder(tmp_path / "pinned", tie_word_embeddings=True))
    assert [a.kind for a in fix(pinned, dry_run=True).plan.actions] == ["declare-untied"]
    # t5-small's config.json writes neither key: the written false would switch the decoder's scaling.
    bare = _with_own_head(tiny_t5_folder(tmp_path / "t5", tie_word_embeddings=None, scale_decoder_outputs=None))
    written = json.loads((bare / "config.json").read_text())
    assert transformers.T5Config.from_dict({**written, "tie_word_embeddings": False}).scale_decoder_outputs is False
    plan = fix(bare, dry_run=True).plan
    assert (plan.actions, plan.config) == ([], {})
    assert plan.unanswered[0].startswith("TC015 lm_head.weight, shared.weight: declared by config.json "
                                         "tie_word_embeddings (T5Config)")
    assert plan.unanswered[0].endswith("which fix cannot rewrite: writing tie_word_embeddings=false also changes "
                                       f"T5Config (transformers {transformers.__version__})'s scale_decoder_outputs "
                                       "from true to false, so the copy would compute different outputs")


def test_a_tie_on_flan_t5_would_change_the_decoder_scale_and_is_refused(tmp_path):
    folder = _with_own_head(tiny_t5_folder(tmp_path / "flan", **FLAN))
    written = json.loads((folder / "config.json").read_text())
    # What transformers does: the flag flips T5's output scaling when config.json does not pin it.
    assert transformers.T5Config.from_dict(written).scale_decoder_outputs is False
    assert transformers.T5Config.from_dict({**written, "tie_word_embeddings": True}).scale_decoder_outputs is True
    out = tmp_path / "out"
    with pytest.raises(TiecheckError, match=r"^--tie lm_head\.weight=shared\.weight: writing "
                                            r"tie_word_embeddings=true also changes T5Config \(transformers [^)]+\)'s "
                                            r"scale_decoder_outputs from false to true, so the copy would compute "
                                            r"different outputs$"):
        fix(folder, out, tie=["lm_head.weight=shared.weight"])
    assert not out.exists()


def test_a_config_that_pins_the_scale_takes_the_tie(tmp_path):
    # The same folder saved by transformers 5 writes scale_decoder_outputs itself: the flag changes nothing else.
    folder = _with_own_head(tiny_t5_folder(tmp_path / "flan", tie_word_embeddings=False))
    assert edit_refusal(folder, {"tie_word_embeddings": True}) is None
    plan = fix(folder, dry_run=True, tie=["lm_head.weight=shared.weight"]).plan
    assert plan.config == {"tie_word_embeddings": True}
    assert [a.kind for a in plan.actions] == ["tie"]


def test_a_class_that_takes_the_flag_is_not_refused(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2).to_dict()
    folder = _config(tmp_path / "llama", cfg)
    assert edit_refusal(folder, {"tie_word_embeddings": True}) is None
    assert edit_refusal(folder, {"tie_word_embeddings": False}) is None


def test_a_class_that_copies_the_flag_into_its_text_config_is_not_refused(tmp_path):
    cfg = transformers.Pix2StructConfig().to_dict()
    folder = _config(tmp_path / "p2s", {**cfg, "tie_word_embeddings": False})
    # What transformers does: the top flag is copied into text_config, the model the edit asks for.
    after = transformers.Pix2StructConfig.from_dict({**cfg, "tie_word_embeddings": True})
    assert after.text_config.tie_word_embeddings is True
    assert edit_refusal(folder, {"tie_word_embeddings": True}) is None


def test_a_class_that_sets_the_flag_false_refuses_a_tie(tmp_path):
    folder = _config(tmp_path / "blt", transformers.BltPatcherConfig().to_dict())
    assert transformers.BltPatcherConfig.from_dict({**transformers.BltPatcherConfig().to_dict(),
                                                    "tie_word_embeddings": True}).tie_word_embeddings is False
    refusal = edit_refusal(folder, {"tie_word_embeddings": True})
    assert refusal.startswith("BltPatcherConfig (transformers ")
    assert "sets tie_word_embeddings to false itself when config.json writes true" in refusal


@pytest.mark.parametrize("cfg", [{"model_type": "no-such-model"}, {"architectures": ["X"]}, "not json"])
def test_a_config_the_class_cannot_be_asked_about_is_left_to_verification(tmp_path, cfg):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    assert edit_refusal(folder, {"tie_word_embeddings": True}) is None


def test_an_edit_that_adds_a_sub_config_the_class_did_not_have_is_a_change(tmp_path):
    # LlamaConfig keeps an unknown mapping as it is: the edit reads back, but text_config is new.
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2).to_dict()
    folder = _config(tmp_path / "llama", cfg)
    assert edit_refusal(folder, {"text_config.tie_word_embeddings": False}) == (
        f"writing text_config.tie_word_embeddings=false also changes LlamaConfig (transformers "
        f"{transformers.__version__})'s text_config from null to {{\"tie_word_embeddings\": false}}, so the copy "
        f"would compute different outputs")


def test_a_path_through_a_value_that_is_no_mapping_reads_nothing():
    assert _get_path({"text_config": None, "a": {"b": 1}}, "text_config.tie_word_embeddings") is None
    assert _get_path({"a": {"b": 1}}, "a.b") == 1


def test_a_config_the_class_refuses_is_left_to_the_copys_verification(tmp_path):
    # LlamaConfig refuses a tie_word_embeddings of 1 (transformers 5 validates the field): the class cannot be
    # asked what an edit makes of the folder, so no refusal is said here; the copy is verified by loading it.
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2).to_dict()
    cfg["tie_word_embeddings"] = 1
    with pytest.raises(Exception, match="tie_word_embeddings"):  # transformers 5's validation error
        transformers.LlamaConfig.from_dict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert edit_refusal(tmp_path, {"tie_word_embeddings": False}) is None
