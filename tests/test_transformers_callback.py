"""``TiecheckCallback`` in a real ``transformers.Trainer``: what it says about each checkpoint it sees written."""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
# Imported plainly once transformers is there: a packaging break must fail these tests, not skip them.
from tiecheck.integrations.transformers import TiecheckCallback  # noqa: E402 - after the importorskip that guards it
from tiecheck.runtime import TieLostWarning  # noqa: E402 - idem

from support.hf import ReplaceHeadAt  # noqa: E402 - idem

TIE = ("lm_head.weight", "transformer.wte.weight")


def _gpt2(**overrides):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, **overrides)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _train(tmp_path, model, callbacks, **args):
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (4, 8), generator=g)]
    kw = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, report_to=[],
              save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    kw.update(args)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**kw), train_dataset=data,
                                   callbacks=list(callbacks))
    trainer.train()
    return trainer


def test_a_checkpoint_written_with_the_tie_broken_is_warned_about_from_the_trainer(tmp_path):
    model = _gpt2()
    cb = TiecheckCallback(model, on_lost="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path, model, [ReplaceHeadAt(1), cb], save_strategy="steps", save_steps=2)
    folder = str(tmp_path / "out" / "checkpoint-2")
    [(saved, [verdict])] = cb.saves
    assert saved == folder
    assert verdict.names == TIE
    assert not verdict.kept
    on_disk = [w for w in caught if issubclass(w.category, TieLostWarning) and str(w.message).startswith("checkpoint ")]
    assert [str(w.message) for w in on_disk] == [f"checkpoint {folder}: {', '.join(TIE)}: {verdict.text}"]
    # stacklevel=2: the warning points at the line of transformers' CallbackHandler.call_event that called on_save.
    lines, first = inspect.getsourcelines(transformers.trainer_callback.CallbackHandler.call_event)
    assert on_disk[0].filename == inspect.getsourcefile(transformers.trainer_callback.CallbackHandler)
    assert first <= on_disk[0].lineno < first + len(lines)


def test_a_checkpoint_that_keeps_the_tie_is_logged_not_warned(tmp_path, caplog):
    model = _gpt2()
    cb = TiecheckCallback(model)
    with caplog.at_level(logging.INFO, logger="tiecheck"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path, model, [cb], save_strategy="steps", save_steps=2)
    folder = str(tmp_path / "out" / "checkpoint-2")
    [(_, [verdict])] = cb.saves
    assert verdict.kept
    assert [r.getMessage() for r in caplog.records if r.name == "tiecheck" and r.getMessage().startswith("checkpoint ")] \
        == [f"checkpoint {folder}: {', '.join(TIE)}: {verdict.text}"]
    assert not [w for w in caught if issubclass(w.category, TieLostWarning)]


def test_a_model_without_ties_records_no_checkpoint_verdicts(tmp_path):
    model = _gpt2(tie_word_embeddings=False)
    cb = TiecheckCallback(model)
    _train(tmp_path, model, [cb], save_strategy="steps", save_steps=2)
    assert cb.guard.ties == []
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert cb.saves == []


def test_check_save_false_reads_no_checkpoint(tmp_path):
    model = _gpt2()
    cb = TiecheckCallback(model, check_save=False)
    _train(tmp_path, model, [cb], save_strategy="steps", save_steps=2)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert cb.saves == []


def test_a_star_import_brings_the_callback_alone():
    # `from tiecheck.integrations.transformers import *` next to transformers' own names must not rebind
    # `TrainerCallback`, `os` or `log` in the importing module.
    names: dict = {}
    exec("from tiecheck.integrations.transformers import *", names)
    assert sorted(k for k in names if k != "__builtins__") == ["TiecheckCallback"]


def test_without_a_model_the_ties_are_recorded_when_the_trainer_is_built(tmp_path):
    # on_init_end, in Trainer.__init__: the ties are those of the model as given, before train() can touch it.
    cb = TiecheckCallback()
    model = _gpt2()
    transformers.Trainer(model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                          report_to=[]),
                         callbacks=[cb])
    assert cb.guard is not None
    assert cb.guard.model is model
    assert [t.names for t in cb.guard.ties] == [TIE]


@pytest.mark.parametrize("save", [False, True], ids=["no-save", "save"])
def test_hooks_called_without_a_model_do_nothing(tmp_path, save):
    # The hooks take model=None, as TrainerCallback's do: a caller that passes none gets no guard and no check.
    cb = TiecheckCallback()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="best",
                                          eval_strategy="steps", metric_for_best_model="loss")
    state = transformers.TrainerState(global_step=1, epoch=1.0)
    control = transformers.TrainerControl(should_save=save)
    for hook in (cb.on_init_end, cb.on_train_begin, cb.on_step_end, cb.on_epoch_end, cb.on_evaluate, cb.on_save,
                 cb.on_train_end):
        assert hook(args, state, control) is None
    assert cb.guard is None
    assert cb.saves == []


def test_a_resume_from_the_first_step_is_named_as_a_resume(tmp_path, monkeypatch):
    _train(tmp_path, _gpt2(), [], max_steps=1, save_strategy="steps", save_steps=1)
    model = _gpt2()
    cb = TiecheckCallback(model)
    seen: list[str] = []
    check = cb.guard.check

    def recording(where="check", **kw):
        seen.append(where)
        return check(where, **kw)

    monkeypatch.setattr(cb.guard, "check", recording)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (4, 8), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert seen[0] == "on_train_begin (after resuming at step 1)"
