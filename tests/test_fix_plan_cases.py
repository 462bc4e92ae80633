"""The plan of ``tiecheck fix`` for inputs the other fix tests do not build: a head stored as the
embedding's transpose, three equal copies, folders whose config ties a head to an embedding they do
not store (transformers 5 then ties the missing name to the stored one), T5's ties that
``tie_word_embeddings`` does not govern, ``--tie`` requests that contradict each other, and the
words each layout's alias is described with."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tiecheck.api import examine
from tiecheck.errors import TiecheckError
from tiecheck.loaders import load_path
from tiecheck.repair import fix
from tiecheck.repair.actions import Plan, make_plan
from tiecheck.repair.layouts import TORCH

from support.checkpoints import llama_config, llama_tensors, write_safetensors, write_sharded
from support.hf import tiny_t5_folder


def _pair(tmp_path, head: torch.Tensor | None = None, more: dict | None = None):
    torch.manual_seed(0)
    emb = torch.randn(16, 4)
    tensors = {"tok_emb.weight": emb, "head.weight": emb.clone() if head is None else head, **(more or {})}
    return write_safetensors(tmp_path / "in.safetensors", tensors), emb


def test_a_transposed_copy_is_left_without_a_tie_command(tmp_path):
    # A head stored as Eᵀ is TC005 (a transposed copy), but two shapes cannot be one tensor:
    # a `--tie` command for it would be one that fix itself refuses.
    torch.manual_seed(0)
    emb = torch.randn(16, 4)
    src = write_safetensors(tmp_path / "in.safetensors", {"tok_emb.weight": emb, "head.weight": emb.T.contiguous()})
    plan = fix(src, dry_run=True).plan
    assert plan.actions == []
    assert plan.unanswered == ["TC005 head.weight, tok_emb.weight: equal copies that nothing declares one tensor "
                               "(models keep some apart on purpose)"]
    assert plan.changes() is False


def test_three_equal_copies_are_left_without_a_tie_command(tmp_path):
    # One TC005 over three names: a tie joins two, so no command is offered (and none is guessed).
    torch.manual_seed(0)
    emb = torch.randn(16, 4)
    src = write_safetensors(tmp_path / "in.safetensors", {"tok_emb.weight": emb, "head.weight": emb.clone(),
                                                          "aux.weight": emb.clone()})
    plan = fix(src, dry_run=True).plan
    assert plan.actions == []
    assert plan.unanswered == ["TC005 aux.weight, head.weight, tok_emb.weight: equal copies that nothing declares "
                               "one tensor (models keep some apart on purpose)"]


def test_a_plan_says_whether_it_changes_anything(tmp_path):
    src, _ = _pair(tmp_path)
    assert fix(src, dry_run=True).plan.changes() is True


@pytest.mark.parametrize(("kind", "words"), [
    ("safetensors", "recorded in __metadata__, as safetensors.torch.save_model does"),
    ("torch", "one storage saved under both names"),
])
def test_each_layout_says_how_its_alias_is_kept(tmp_path, kind, words):
    src, emb = _pair(tmp_path)
    if kind == "torch":
        src = tmp_path / "in.pt"
        torch.save({"tok_emb.weight": emb, "head.weight": emb.clone()}, src)
    (action,) = fix(src, dry_run=True, tie=["head.weight=tok_emb.weight"]).plan.actions
    assert action.detail == f"head.weight becomes an alias of tok_emb.weight ({words})"


def test_a_tie_onto_a_misspelt_kept_name_names_the_misspelling(tmp_path):
    src, _ = _pair(tmp_path)
    with pytest.raises(TiecheckError, match=r"^--tie: 'tok_emb\.wieght' is not a tensor of the target; "
                                            r"see `tiecheck inspect`$"):
        fix(src, dry_run=True, tie=["head.weight=tok_emb.wieght"])


@pytest.mark.parametrize(("ties", "message"), [
    (["head.weight=tok_emb.weight", "head.weight=tok_emb.weight"],
     r"--tie head\.weight=tok_emb\.weight: head\.weight is already planned to become tok_emb\.weight"),
    (["head.weight=tok_emb.weight", "head.weight=aux.weight"],
     r"--tie head\.weight=aux\.weight: head\.weight is already planned to become tok_emb\.weight"),
    (["head.weight=tok_emb.weight", "tok_emb.weight=head.weight"],
     r"--tie tok_emb\.weight=head\.weight: head\.weight is already planned to become tok_emb\.weight"),
    (["head.weight=aux.weight", "aux.weight=tok_emb.weight", "tok_emb.weight=head.weight"],
     r"--tie tok_emb\.weight=head\.weight: head\.weight is already planned to become tok_emb\.weight"),
])
def test_ties_that_contradict_each_other_are_refused(tmp_path, ties, message):
    # Each name is dropped once, and never onto a name that is itself planned to become it: a
    # cycle would drop every name of it, and the copy would hold none of them.
    src, _ = _pair(tmp_path, head=torch.randn(16, 4), more={"aux.weight": torch.randn(16, 4)})
    with pytest.raises(TiecheckError, match=message):
        fix(src, dry_run=True, tie=ties)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_chain_of_ties_ends_at_the_last_kept_name(tmp_path):
    src, emb = _pair(tmp_path, head=torch.randn(16, 4), more={"aux.weight": torch.randn(16, 4)})
    out = tmp_path / "out.safetensors"
    result = fix(src, out, tie=["head.weight=aux.weight", "aux.weight=tok_emb.weight"])
    assert result.verified, result.checks
    assert result.plan.kept("head.weight") == "tok_emb.weight"
    stored = load_file(out)
    assert list(stored) == ["tok_emb.weight"]
    assert torch.equal(stored["tok_emb.weight"], emb)


def test_kept_stops_on_a_cycle_of_drops():
    plan = Plan(target="t", layout=TORCH, drop={"a": "b", "b": "c", "c": "a"})
    assert plan.kept("a") == "a"
    assert plan.kept("d") == "d"


def test_make_plan_leaves_optimizer_state_unless_told(tmp_path):
    # The library call's default is the CLI's: optimizer state is dropped only when asked.
    src = tmp_path / "ckpt.pt"
    w = torch.randn(16, 4)
    torch.save({"model": {"emb.weight": w, "head.weight": w.clone()}, "optimizer": {"state": {0: {"step": 1}}}}, src)
    analysis = examine(load_path(src, whole=True))
    with pytest.raises(TiecheckError, match=r"holds optimizer state \(optimizer\).*--drop-optimizer"):
        make_plan(analysis, src, TORCH, tie=[("head.weight", "emb.weight")], optimizer_keys=["optimizer"])


# -- Hugging Face folders ---------------------------------------------------------------------------


def _llama_folder(tmp_path, tensors: dict, tie: bool = True):
    folder = tmp_path / "llama"
    folder.mkdir()
    cfg = llama_config()
    cfg["tie_word_embeddings"] = tie
    (folder / "config.json").write_text(json.dumps(cfg))
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


def _head_only_folder(tmp_path):
    """A tied Llama folder that stores the head and not the embedding."""
    tensors = llama_tensors()
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    return _llama_folder(tmp_path, tensors), tensors["lm_head.weight"]


@pytest.mark.parametrize("head_only", [False, True])
def test_a_folder_tied_as_declared_is_left_alone(tmp_path, head_only):
    folder = _head_only_folder(tmp_path)[0] if head_only else _llama_folder(tmp_path, llama_tensors())
    plan = fix(folder, dry_run=True).plan
    assert (plan.actions, plan.config) == ([], {})
    assert plan.unanswered == ["1 info finding (TC012): observations with nothing to repair; `tiecheck inspect` "
                               "shows them"]


def test_an_untie_in_a_folder_storing_only_the_head_copies_the_stored_head(tmp_path):
    folder, head = _head_only_folder(tmp_path)
    # What transformers makes of it: the missing embedding is tied to the stored head.
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head)

    out = tmp_path / "out"
    result = fix(folder, out, untie=["lm_head.weight,model.embed_tokens.weight"])
    # The stored head keeps its bytes; the embedding the files lacked is written as its copy.
    assert result.plan.copy == {"model.embed_tokens.weight": "lm_head.weight"}
    (action,) = result.plan.actions
    assert action.names == ("model.embed_tokens.weight", "lm_head.weight")
    assert action.disk_saved == -head.numel() * head.element_size()
    assert result.verified, result.checks
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    stored = load_file(out / "model.safetensors")
    assert torch.equal(stored["lm_head.weight"], head)
    assert torch.equal(stored["model.embed_tokens.weight"], head)
    untied = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert torch.equal(untied.model.embed_tokens.weight, head)


@pytest.mark.parametrize("pair", ["lm_head.weight,model.embed_tokens.weight",
                                  "model.embed_tokens.weight,lm_head.weight"])
def test_an_untie_of_two_stored_copies_names_them_as_the_config_does(tmp_path, pair):
    # Both stored and equal, tied by the config alone: the declaration changes, and the action
    # names the config's pair in its own order (the head, then the embedding it was tied to).
    tensors = llama_tensors()
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    plan = fix(_llama_folder(tmp_path, tensors), dry_run=True, untie=[pair]).plan
    (action,) = plan.actions
    assert (action.kind, action.names) == ("untie", ("lm_head.weight", "model.embed_tokens.weight"))
    # Nothing more on disk; in memory, the head transformers shared is now a tensor of its own.
    assert (action.disk_saved, action.memory_saved) == (0, -16 * 8 * 4)
    assert plan.config == {"tie_word_embeddings": False}
    assert plan.copy == {}


def test_a_declared_untie_saves_and_costs_nothing(tmp_path):
    torch.manual_seed(2)
    tensors = {**llama_tensors(), "lm_head.weight": torch.randn(16, 8)}
    plan = fix(_llama_folder(tmp_path, tensors), dry_run=True).plan
    (action,) = plan.actions
    assert (action.kind, action.why, action.disk_saved, action.memory_saved) == ("declare-untied", "TC015", 0, 0)
    assert plan.totals() == {"disk_saved": 0, "memory_saved": 0}


def test_a_tie_tie_word_embeddings_does_not_govern_is_left_to_the_user(tmp_path):
    folder = tiny_t5_folder(tmp_path / "t5")
    # T5's config sets tie_word_embeddings itself: a config.json that says false still ties the
    # encoder's embedding to `shared` in transformers, so rewriting the key cannot untie it.
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**written, "tie_word_embeddings": False}))
    model = transformers.T5ForConditionalGeneration(transformers.AutoConfig.from_pretrained(folder))
    assert model.get_expanded_tied_weights_keys(all_submodels=True)["encoder.embed_tokens.weight"] == "shared.weight"
    (folder / "config.json").write_text(json.dumps(written))
    sd = load_file(folder / "model.safetensors")
    assert "encoder.embed_tokens.weight" not in sd
    sd["encoder.embed_tokens.weight"] = torch.randn(32, 8)  # stored apart, and different: TC015
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    plan = fix(folder, dry_run=True).plan
    assert (plan.actions, plan.config) == ([], {})
    assert plan.unanswered[0] == ("TC015 encoder.embed_tokens.weight, shared.weight: declared by "
                                  "T5ForConditionalGeneration._tied_weights_keys, which fix cannot rewrite")


def test_an_untie_of_a_pair_no_declaration_names_is_refused(tmp_path):
    # lm_head and the encoder embedding share memory through `shared`, but no declaration ties the two.
    folder = tiny_t5_folder(tmp_path / "t5")
    with pytest.raises(TiecheckError, match=r"^--untie lm_head\.weight,encoder\.embed_tokens\.weight: not a tie "
                                            r"the config declares; transformers would tie them again$"):
        fix(folder, dry_run=True, untie=["lm_head.weight,encoder.embed_tokens.weight"])


def test_re_pointing_an_alias_saves_no_stored_bytes(tmp_path):
    # safetensors.torch.save_model stores a tied head once and records it as an alias; tying that
    # alias to another name frees nothing on disk or in memory (its bytes were never stored).
    src, emb = _pair(tmp_path, more={"aux.weight": torch.randn(16, 4)})
    save_file({"tok_emb.weight": emb, "aux.weight": torch.randn(16, 4)}, str(src),
              metadata={"head.weight": "tok_emb.weight"})
    (action,) = fix(src, dry_run=True, tie=["head.weight=aux.weight"]).plan.actions
    assert (action.kind, action.disk_saved, action.memory_saved) == ("tie", 0, 0)


def test_a_declared_retie_also_answers_the_copy_it_removes(tmp_path):
    # An alias recorded in __metadata__ over a name that is stored too: TC016 (declared, stored twice)
    # and TC005 (an equal copy a declaration ties). The retie answers both; none is left for the user.
    torch.manual_seed(3)
    w = torch.randn(8, 8)
    src = write_safetensors(tmp_path / "in.safetensors", {"blocks.0.w": w, "blocks.1.w": w.clone()},
                            metadata={"blocks.1.w": "blocks.0.w"})
    out = tmp_path / "out.safetensors"
    result = fix(src, out)
    (action,) = result.plan.actions
    assert (action.kind, action.why, action.names) == ("retie", "TC016", ("blocks.1.w", "blocks.0.w"))
    assert ("TC005", frozenset({"blocks.0.w", "blocks.1.w"})) in result.plan.answered
    assert result.plan.unanswered == []
    assert result.verified, result.checks
    assert list(load_file(out)) == ["blocks.0.w"]


def _gpt2_folder(tmp_path, head: torch.Tensor | None = None):
    """A GPT-2 folder whose config.json leaves tie_word_embeddings to GPT2Config's default (true)."""
    cfg = transformers.GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    written.pop("tie_word_embeddings", None)
    (folder / "config.json").write_text(json.dumps(written))
    assert transformers.AutoConfig.from_pretrained(folder).tie_word_embeddings is True
    if head is not None:
        sd = load_file(folder / "model.safetensors")
        save_file({**sd, "lm_head.weight": head}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_an_untie_writes_the_flag_a_config_left_to_its_default(tmp_path):
    folder = _gpt2_folder(tmp_path)
    out = tmp_path / "out"
    result = fix(folder, out, untie=["lm_head.weight,transformer.wte.weight"])
    assert result.plan.config == {"tie_word_embeddings": False}
    assert result.verified, result.checks
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_a_tie_writes_the_flag_a_config_left_to_its_default(tmp_path):
    # Engines that read config.json without GPT2Config's defaults see the tie said, not implied.
    torch.manual_seed(4)
    folder = _gpt2_folder(tmp_path, head=torch.randn(16, 8))
    plan = fix(folder, dry_run=True, tie=["lm_head.weight=transformer.wte.weight"]).plan
    assert plan.config == {"tie_word_embeddings": True}
    assert plan.drop == {"lm_head.weight": "transformer.wte.weight"}


def test_a_tie_of_a_pair_the_folder_does_not_declare_names_the_declared_pair(tmp_path):
    torch.manual_seed(5)
    folder = _llama_folder(tmp_path, {**llama_tensors(), "lm_head.weight": torch.randn(16, 8)}, tie=False)
    with pytest.raises(TiecheckError, match=r"in this folder --tie takes the declared pair "
                                            r"lm_head\.weight=model\.embed_tokens\.weight$"):
        fix(folder, dry_run=True, tie=["model.embed_tokens.weight=lm_head.weight"])


def test_a_contradicted_tie_whose_flag_is_a_default_is_declared_untied(tmp_path):
    # config.json leaves tie_word_embeddings to GPT2Config (true) while the files store a head of
    # its own: fix writes the flag false, as --untie does, and the copy loads as stored.
    torch.manual_seed(6)
    head = torch.randn(16, 8)
    folder = _gpt2_folder(tmp_path, head=head)
    out = tmp_path / "out"
    result = fix(folder, out)
    (action,) = result.plan.actions
    assert (action.kind, action.why) == ("declare-untied", "TC015")
    assert result.plan.config == {"tie_word_embeddings": False}
    assert result.plan.unanswered == []
    assert result.verified, result.checks
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, head)


def test_a_misspelt_name_is_shown_with_three_names_ending_alike(tmp_path):
    src = write_safetensors(tmp_path / "in.safetensors", {f"{c}.weight": torch.zeros(2) for c in "abcd"})
    with pytest.raises(TiecheckError, match=r"'x\.weight' is not a tensor of the target \(names ending alike: "
                                            r"a\.weight, b\.weight, c\.weight\); see"):
        fix(src, dry_run=True, tie=["x.weight=a.weight"])


def test_a_contradiction_every_loader_keeps_apart_is_not_acted_on(tmp_path):
    # T5Config resolves tie_word_embeddings to true whatever config.json writes; with false written and a
    # head of its own stored, both loaders keep the stored head (TC015 as info): nothing to repair.
    folder = tiny_t5_folder(tmp_path / "t5")
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**written, "tie_word_embeddings": False}))
    sd = load_file(folder / "model.safetensors")
    save_file({**sd, "lm_head.weight": torch.randn(32, 8)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    plan = fix(folder, dry_run=True).plan
    assert (plan.actions, plan.config) == ([], {})


def test_a_broken_tie_a_sharded_index_cannot_alias_is_said_whole(tmp_path):
    # The reason is the refusal's text after "--tie A=B: ", also where a name holds ": " itself.
    torch.manual_seed(7)
    emb = torch.randn(16, 4)
    index = write_sharded(tmp_path / "sharded", {"m: 0.tok_emb.weight": emb, "m: 0.head.weight": emb.clone(),
                                                 "m: 0.ln.weight": torch.ones(4)})
    plan = fix(index, dry_run=True).plan
    assert plan.actions == []
    assert plan.unanswered == ["TC005 m: 0.head.weight, m: 0.tok_emb.weight: a sharded checkpoint without "
                               "config.json has no alias that loaders restore across shards; fix the Hugging Face "
                               "folder it belongs to"]


def test_an_untie_writes_the_flag_everywhere_the_config_writes_it(tmp_path):
    # A Llava config.json writes tie_word_embeddings at the top and in text_config (save_pretrained
    # writes both): the untie sets each, so a reader of either sees the copy untied.
    text = {"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    vision = {"model_type": "clip_vision_model", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
    cfg = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=31)
    folder = tmp_path / "llava"
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    assert (written["tie_word_embeddings"], written["text_config"]["tie_word_embeddings"]) == (True, True)
    plan = fix(folder, dry_run=True, untie=["lm_head.weight,model.language_model.embed_tokens.weight"]).plan
    assert plan.config == {"tie_word_embeddings": False, "text_config.tie_word_embeddings": False}
