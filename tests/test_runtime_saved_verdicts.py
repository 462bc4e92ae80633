"""The guards' verdicts on saved checkpoints, each seen saying "NOT kept" for a checkpoint that
really loses a tie: ``saved_ties`` over safetensors folders, the Lightning callback over the
state dict Lightning writes, the Trainer callback over the folder the Trainer wrote.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tiecheck import runtime
from tiecheck.runtime import GuardedTie, TieLostWarning

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from tiecheck.integrations import lightning as lit_callbacks  # noqa: E402 - after the importorskips that guard it
from tiecheck.integrations import transformers as hf_callbacks  # noqa: E402 - idem

from support.lit import LitEmbHead  # noqa: E402 - idem

DECLARED = "EmbHead._tied_weights_keys"


def _folder(tmp_path, name: str, tensors: dict, metadata: dict | None = None):
    folder = tmp_path / name
    folder.mkdir()
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    return folder


def _tie(declared: bool, names=("emb.weight", "head.weight")) -> GuardedTie:
    return GuardedTie(tuple(sorted(names)), True, DECLARED if declared else None)


W = torch.ones(32, 8)


@pytest.mark.parametrize(("declared", "kept", "text"), [
    (True, True, f"kept: emb.weight stored once; head.weight re-tied on load ({DECLARED})"),
    (False, False, "NOT kept: emb.weight stored once; head.weight nothing declares the tie, so a load initialises "
                   "them afresh"),
])
def test_one_name_stored_is_kept_only_where_the_tie_is_declared(tmp_path, declared, kept, text):
    folder = _folder(tmp_path, "one", {"emb.weight": W})
    [v] = runtime.saved_ties(folder, [_tie(declared)])
    assert (v.kept, v.stored, v.text) == (kept, ("emb.weight",), text)


@pytest.mark.parametrize(("declared", "why"), [
    (True, f"a load re-ties them ({DECLARED})"),
    (False, "nothing declares the tie, so a resumed run trains them apart"),
])
def test_both_names_stored_is_never_kept(tmp_path, declared, why):
    folder = _folder(tmp_path, "both", {"emb.weight": W, "head.weight": W.clone()})
    [v] = runtime.saved_ties(folder, [_tie(declared)])
    assert (v.kept, v.stored) == (False, ("emb.weight", "head.weight"))
    assert v.text == f"NOT kept: emb.weight, head.weight are all stored, as 2 copies; {why}"


def test_no_name_stored_is_not_kept(tmp_path):
    folder = _folder(tmp_path, "none", {"other": W})
    [v] = runtime.saved_ties(folder, [_tie(True)])
    assert (v.kept, v.stored, v.text) == (False, (), "NOT kept: none of the names is in the checkpoint")


def test_an_alias_to_a_name_not_stored_is_not_kept(tmp_path):
    """The alias map names the head's source, but that source is not in the files."""
    folder = _folder(tmp_path, "dangling", {"other": W}, metadata={"head.weight": "emb.weight"})
    [v] = runtime.saved_ties(folder, [_tie(False)])
    assert not v.kept


def test_three_names_one_aliased_one_missing_is_not_kept_unless_declared(tmp_path):
    names = ("a.weight", "b.weight", "c.weight")
    folder = _folder(tmp_path, "three", {"a.weight": W}, metadata={"b.weight": "a.weight"})
    [v] = runtime.saved_ties(folder, [_tie(False, names)])
    assert (v.kept, v.stored) == (False, ("a.weight",))
    assert v.text.startswith("NOT kept: a.weight stored once; c.weight nothing declares")
    [v] = runtime.saved_ties(folder, [_tie(False, names[:2])])
    assert v.kept  # a and b alone: b aliased to a


def test_a_checkpoint_tiecheck_cannot_read_warns_and_gives_no_verdict(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.warns(TieLostWarning, match=r"cannot tell whether it keeps the ties"):
        assert runtime.saved_ties(folder, [_tie(True)]) is None


# --- Lightning: what on_save_checkpoint sees is what Lightning writes ---------------------------

class CopyHeadInCheckpoint(pl.Callback):
    """Stores the head as a copy of its own in the checkpoint (as a state-dict hook that clones would)."""

    def __init__(self, how: str):
        self.how = how

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        state = checkpoint["state_dict"]
        if self.how == "copy":
            state["model.head.weight"] = state["model.head.weight"].clone()
        else:
            del state["model.head.weight"]


@pytest.mark.parametrize(("how", "text"), [
    ("copy", "NOT kept: model.emb.weight, model.head.weight are stored as separate copies"),
    ("dropped", "NOT kept: only model.emb.weight is in the state dict; loading it strictly fails, and non-strictly "
                "leaves the others as they are"),
])
def test_lightning_says_not_kept_for_a_checkpoint_that_loses_the_tie(tmp_path, how, text):
    cb = lit_callbacks.TiecheckCallback()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[CopyHeadInCheckpoint(how), cb], default_root_dir=str(tmp_path))
    trainer.fit(LitEmbHead(batches=2))
    with pytest.warns(TieLostWarning, match=r"checkpoint at step 1: model.emb.weight, model.head.weight: NOT kept"):
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    [(step, [v])] = cb.saves
    assert (step, v.kept, v.text) == (1, False, text)
    # The verdict is true of the file Lightning wrote.
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    if how == "copy":
        assert state["model.head.weight"].untyped_storage().data_ptr() != \
            state["model.emb.weight"].untyped_storage().data_ptr()
    else:
        assert "model.head.weight" not in state


def test_lightning_none_of_the_names_in_the_state_dict_is_not_kept():
    v = lit_callbacks._saved(("a", "b"), {"c": torch.ones(2)})
    assert (v.kept, v.text) == (False, "NOT kept: none of the names is in the state dict")


def test_lightning_two_views_of_one_storage_at_different_offsets_are_not_one_tensor():
    base = torch.arange(8.0)
    v = lit_callbacks._saved(("a", "b"), {"a": base[:4], "b": base[4:]})
    assert not v.kept
    v = lit_callbacks._saved(("a", "b"), {"a": base[:4], "b": base[:4]})
    assert v.kept


# --- transformers' Trainer: on_save reads the folder the Trainer wrote ---------------------------

class StoreHeadApart(transformers.TrainerCallback):
    """Rewrites the saved checkpoint so that it stores the head as a copy of its own."""

    def on_save(self, args, state, control, **kwargs):
        folder = f"{args.output_dir}/checkpoint-{state.global_step}"
        path = f"{folder}/model.safetensors"
        with safetensors_torch.safe_open(path, "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
            meta = fh.metadata()
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
        safetensors_torch.save_file(tensors, path, metadata=meta)


def test_trainer_says_not_kept_for_a_checkpoint_that_stores_two_copies(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    cb = hf_callbacks.TiecheckCallback(model)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (2, 8))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="steps", save_steps=1, use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[StoreHeadApart(), cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    [(folder, [v])] = cb.saves
    assert folder.endswith("checkpoint-1")
    assert not v.kept
    assert v.text.startswith("NOT kept: lm_head.weight, transformer.wte.weight are all stored, as 2 copies; a load "
                             "re-ties them (GPT2LMHeadModel._tied_weights_keys")
    said = [str(w.message) for w in caught if issubclass(w.category, TieLostWarning)]
    assert said == [f"checkpoint {folder}: lm_head.weight, transformer.wte.weight: {v.text}"]
