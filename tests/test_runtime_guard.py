"""TieGuard and the training callbacks: ties recorded once, checked where training changes the model."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from tiecheck import runtime
from tiecheck.errors import TiecheckError
from tiecheck.runtime import TieGuard, TieLostError, TieLostWarning
from tiecheck.testing import TieAssertionError

# The callbacks' libraries are in the `test` extra; each integration module imports its own.
transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")
save_file = pytest.importorskip("safetensors.torch").save_file
save_model = pytest.importorskip("safetensors.torch").save_model
# The project's own modules are imported plainly once their libraries are there: a packaging break must
# fail these tests, not skip them.
from tiecheck.integrations import lightning as lit_callbacks  # noqa: E402 - after the importorskips that guard it
from tiecheck.integrations import transformers as hf_callbacks  # noqa: E402 - idem

from support.guards import record_checks  # noqa: E402 - beside the support import below
from support.hf import ReplaceHeadAt  # noqa: E402 - imports transformers, guarded above


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.emb(x))))


def _batches(n: int = 4, vocab: int = 32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (2, 6), generator=g) for _ in range(n)]


def _plain_losses(guarded: bool) -> list[float]:
    torch.manual_seed(0)
    model = TinyLM()
    guard = TieGuard(model) if guarded else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x in _batches():
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if guard is not None:
            guard.check(where="after the step", optimizer=opt)
        losses.append(loss.item())
    return losses


# --- plain loops --------------------------------------------------------------------------------

def test_guard_records_the_tie_by_identity_on_meta():
    with torch.device("meta"):
        model = TinyLM()
    guard = TieGuard(model)
    assert [(t.names, t.held_at_build, t.declared_by) for t in guard.ties] == [(("emb.weight", "head.weight"), True,
                                                                                  None)]
    assert guard.check(where="on meta") == []
    assert guard.last_ok == "on meta"


def test_to_empty_unties_and_the_with_block_says_where_and_how_to_retie():
    with torch.device("meta"):
        model = TinyLM()
    def materialize() -> None:
        with TieGuard(model):
            model.to_empty(device="cpu")
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()

    with pytest.raises(TieLostError) as err:
        materialize()
    assert isinstance(err.value, TieAssertionError)
    assert str(err.value) == (
        "1 tie lost, found at the end of the `with TieGuard(model)` block:\n"
        "  emb.weight, head.weight: 2 separate copies: emb.weight | head.weight\n"
        "    held at: when the guard was built; lost by: the end of the `with TieGuard(model)` block\n"
        "    stored twice: 1.00 KiB (1,024 bytes)\n"
        "    re-tie: model.head.weight = model.emb.weight")
    assert [f.code for f in err.value.findings] == ["TC009"]
    assert [t.names for t in err.value.lost] == [("emb.weight", "head.weight")]


def test_meta_init_to_empty_init_retie_passes_and_trains():
    with torch.device("meta"):
        model = TinyLM()
    with TieGuard(model) as guard:
        model.to_empty(device="cpu")
        model.head.weight = model.emb.weight  # the line the message gives
        torch.manual_seed(0)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = _batches(1)[0]
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    assert guard.check(where="after step 1", optimizer=opt) == []
    assert guard.checks == 2
    assert model.head.weight is model.emb.weight


def test_half_gradient_when_the_optimizer_holds_one_copy():
    model = TinyLM()
    guard = TieGuard(model)
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    opt = torch.optim.SGD([model.emb.weight, model.proj.weight], lr=0.1)
    with pytest.raises(TieLostError) as err:
        guard.check(where="after setup", optimizer=opt)
    assert ("    optimizer: half gradient: only emb.weight is in its param groups; head.weight never changes, and "
            "emb.weight learns from its own use alone\n") in str(err.value)
    assert "re-tie: model.head.weight = model.emb.weight; then build the optimizer again" in str(err.value)


def test_assign_true_makes_distinct_parameters_over_one_memory_double_update():
    model = TinyLM()
    guard = TieGuard(model)
    model.load_state_dict(model.state_dict(), assign=True)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TieLostError) as err:
        guard.check(where="after load_state_dict(assign=True)", optimizer=opt)
    msg = str(err.value)
    assert "emb.weight, head.weight: 2 distinct Parameters over one memory: gradients are no longer shared" in msg
    assert "stored twice" not in msg  # one memory: nothing is stored twice
    assert ("optimizer: double update: emb.weight, head.weight are all in its param groups and each steps the one "
            "memory with its own part of the gradient") in msg
    assert [f.code for f in err.value.findings] == ["TC002"]


def test_last_passing_check_is_where_the_tie_still_held():
    model = TinyLM()
    guard = TieGuard(model)
    guard.check(where="after wrap")
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())
    with pytest.raises(TieLostError, match="held at: after wrap; lost by: after compile"):
        guard.check(where="after compile")


def test_warn_mode_returns_the_lost_ties():
    model = TinyLM()
    guard = TieGuard(model, on_lost="warn")
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())
    with pytest.warns(TieLostWarning, match="found at step 10"):
        lost = guard.check(where="step 10")
    assert [(t.names, t.bytes_twice) for t in lost] == [(("emb.weight", "head.weight"), 1024)]
    with pytest.raises(ValueError, match="on_lost must be one of raise, warn"):
        TieGuard(model, on_lost="log")


def test_only_the_report_rank_prints_the_details(monkeypatch):
    model = TinyLM()
    guard = TieGuard(model)
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())
    monkeypatch.setattr(runtime, "_rank", lambda: 3)
    with pytest.raises(TieLostError) as err:
        guard.check(where="after fully_shard")
    assert str(err.value) == ("rank 3: 1 tie lost, found at after fully_shard: emb.weight, head.weight "
                              "(rank 0 reports the details)")
    warn_guard = TieGuard(TinyLM(), on_lost="warn")
    warn_guard.model.head.weight = nn.Parameter(warn_guard.model.head.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank 3 stays quiet in warn mode
        assert len(warn_guard.check(where="x")) == 1


def test_a_note_ends_the_message_on_every_rank(monkeypatch):
    model = TinyLM()
    guard = TieGuard(model)
    assert guard.check(where="step 1", note="checkpoint not written: out/checkpoint-1") == []  # silent while tied
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())
    with pytest.raises(TieLostError) as err:
        guard.check(where="step 2", note="checkpoint not written: out/checkpoint-2")
    assert str(err.value).endswith("re-tie: model.head.weight = model.emb.weight\n"
                                   "  checkpoint not written: out/checkpoint-2")
    monkeypatch.setattr(runtime, "_rank", lambda: 1)
    with pytest.raises(TieLostError) as err:
        guard.check(where="step 2", note="checkpoint not written: out/checkpoint-2")
    assert str(err.value) == ("rank 1: 1 tie lost, found at step 2: emb.weight, head.weight; checkpoint not written: "
                              "out/checkpoint-2 (rank 0 reports the details)")


def test_dtensor_parameters_are_compared_by_their_local_shard(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = TinyLM()
        shared = nn.Parameter(distribute_tensor(model.emb.weight.detach(), mesh, [Replicate()]))
        model.emb.weight = shared
        model.head.weight = shared
        guard = TieGuard(model)
        assert [t.names for t in guard.ties] == [("emb.weight", "head.weight")]
        assert guard.check(where="after distribute") == []
        # Two DTensor Parameters over one local shard: one memory, distinct objects.
        model.head.weight = nn.Parameter(DTensor.from_local(shared.to_local().detach(), mesh, [Replicate()],
                                                            run_check=False))
        assert model.head.weight is not model.emb.weight
        with pytest.raises(TieLostError, match="2 distinct Parameters over one memory"):
            guard.check(where="after load")
    finally:
        dist.destroy_process_group()


def test_guarding_something_that_is_not_a_module_is_one_clear_error():
    with pytest.raises(TiecheckError, match=r"^TieGuard needs a torch\.nn\.Module, not dict: pass the model itself$"):
        TieGuard(dict(TinyLM().state_dict()))


def test_the_guard_changes_nothing_in_a_plain_loop():
    assert _plain_losses(guarded=True) == _plain_losses(guarded=False)


def test_import_runtime_imports_no_training_library():
    code = ("import sys, tiecheck.runtime; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- transformers' Trainer ----------------------------------------------------------------------

def _gpt2(**overrides):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, **overrides)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _train_hf(tmp_path, model, callbacks=(), trainer_cls=None, resume=None, **args):
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (4, 8), generator=g)]
    kw = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
              report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    kw.update(args)
    evaluates = kw.get("eval_strategy", "no") != "no"
    trainer = (trainer_cls or transformers.Trainer)(model=model, args=transformers.TrainingArguments(**kw),
                                                    train_dataset=data, eval_dataset=data if evaluates else None,
                                                    callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_clean_run_passes_and_changes_no_loss(tmp_path):
    cb = hf_callbacks.TiecheckCallback()  # no model: recorded at on_init_end
    _, guarded = _train_hf(tmp_path, _gpt2(), [cb])
    _, plain = _train_hf(tmp_path, _gpt2())
    assert [(t.names, t.declared_by) for t in cb.guard.ties] == [
        (("lm_head.weight", "transformer.wte.weight"),
         "GPT2LMHeadModel._tied_weights_keys and GPT2LMHeadModel.config tie_word_embeddings (GPT2Config)")]
    assert cb.guard.checks == 4  # on_train_begin, after each of the 2 optimizer steps, on_train_end
    assert cb.guard.last_ok == "on_train_end at step 2"
    assert len(guarded) == 2
    assert guarded == plain


class UntyingTrainer(transformers.Trainer):
    def create_optimizer(self, *args, **kwargs):
        # A deliberate untie in setup: the head gets a Parameter of its own before the optimizer is built.
        self.model.lm_head.weight = nn.Parameter(self.model.lm_head.weight.detach().clone())
        return super().create_optimizer(*args, **kwargs)


def test_trainer_untie_in_setup_is_named_with_where_and_cost(tmp_path):
    model = _gpt2()
    with pytest.raises(TieLostError) as err:
        _train_hf(tmp_path, model, [hf_callbacks.TiecheckCallback(model)], trainer_cls=UntyingTrainer)
    msg = str(err.value)
    assert msg.startswith("1 tie lost, found at on_train_begin (after the Trainer set up the model and optimizer):\n"
                          "  lm_head.weight, transformer.wte.weight: 2 separate copies: lm_head.weight | "
                          "transformer.wte.weight\n")
    assert "    stored twice: 4.00 KiB (4,096 bytes)\n" in msg
    assert ("optimizer: double update: lm_head.weight, transformer.wte.weight are all in its param groups, each "
            "stepped with its own part of the gradient, so the copies drift apart") in msg
    assert msg.endswith("re-tie: model.tie_weights(), or model.lm_head.weight = model.transformer.wte.weight; then "
                        "build the optimizer again (it holds the copies)")


def test_trainer_declared_tie_that_never_held_is_reported(tmp_path):
    model = _gpt2()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # separate, config says tied
    with pytest.raises(TieLostError, match=r"held at: when the guard was built \(declared by "
                                           r"GPT2LMHeadModel._tied_weights_keys and GPT2LMHeadModel.config tie_word_embeddings \(GPT2Config\); "
                                           r"never tied here\)"):
        _train_hf(tmp_path, model, [hf_callbacks.TiecheckCallback(model)])


def test_trainer_on_save_says_the_checkpoint_keeps_the_tie_and_resume_is_checked(tmp_path):
    model = _gpt2()
    cb = hf_callbacks.TiecheckCallback(model)
    _train_hf(tmp_path, model, [cb], save_strategy="steps", save_steps=2)
    [(folder, verdicts)] = cb.saves
    assert folder.endswith("checkpoint-2")
    assert [(v.names, v.kept, v.stored) for v in verdicts] == [
        (("lm_head.weight", "transformer.wte.weight"), True, ("transformer.wte.weight",))]
    assert verdicts[0].text == ("kept: transformer.wte.weight stored once; lm_head.weight re-tied on load "
                                "(GPT2LMHeadModel._tied_weights_keys and GPT2LMHeadModel.config tie_word_embeddings "
                                "(GPT2Config))")
    assert cb.guard.last_ok == "on_train_end at step 2"

    resumed = _gpt2()
    cb2 = hf_callbacks.TiecheckCallback(resumed)
    seen = record_checks(cb2.guard)
    _train_hf(tmp_path, resumed, [cb2], max_steps=3, resume=folder)
    assert seen == ["on_train_begin (after resuming at step 2)", "step 3", "on_train_end at step 3"]


def _checkpoints(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("save", [dict(save_strategy="no"), dict(save_strategy="steps", save_steps=2)],
                         ids=["no-saves", "save-every-2"])
def test_trainer_tie_broken_mid_run_is_found_at_that_step_and_never_saved(tmp_path, save):
    model = _gpt2()
    cb = hf_callbacks.TiecheckCallback(model)
    with pytest.raises(TieLostError) as err:
        _train_hf(tmp_path, model, [ReplaceHeadAt(3), cb], max_steps=10, **save)
    msg = str(err.value)
    assert msg.startswith("1 tie lost, found at step 3:\n  lm_head.weight, transformer.wte.weight: 2 separate copies")
    held = "on_save at step 2" if save["save_strategy"] == "steps" else "step 2"  # the last check that passed
    assert f"    held at: {held}; lost by: step 3\n" in msg
    assert "re-tie: model.tie_weights(), or model.lm_head.weight = model.transformer.wte.weight" in msg
    assert _checkpoints(tmp_path) == (["checkpoint-2"] if save["save_strategy"] == "steps" else [])


def test_trainer_check_every_thins_the_steps_but_never_the_check_before_a_save(tmp_path):
    model = _gpt2()
    cb = hf_callbacks.TiecheckCallback(model, check_every=10)
    seen = record_checks(cb.guard)
    with pytest.raises(TieLostError) as err:
        _train_hf(tmp_path, model, [ReplaceHeadAt(3), cb], max_steps=10, save_strategy="steps", save_steps=5)
    folder = tmp_path / "out" / "checkpoint-5"
    msg = str(err.value)
    assert msg.startswith("1 tie lost, found at step 5:\n")
    assert "held at: on_train_begin (after the Trainer set up the model and optimizer); lost by: step 5" in msg
    assert msg.endswith(f"\n  checkpoint not written: {folder} (the run stops before the Trainer saves it)")
    assert seen == ["on_train_begin (after the Trainer set up the model and optimizer)", "step 5"]
    assert _checkpoints(tmp_path) == []


@pytest.mark.parametrize(("save", "where", "step", "kept"), [
    (dict(save_strategy="epoch"), "the end of epoch 2 (step 4)", 4, ["checkpoint-2"]),  # 2 steps an epoch
    (dict(save_strategy="best", eval_strategy="steps", eval_steps=5, metric_for_best_model="loss"),
     "the evaluation at step 5", 5, []),
], ids=["epoch", "best"])
def test_trainer_checks_before_epoch_and_best_model_saves(tmp_path, save, where, step, kept):
    model = _gpt2()
    with pytest.raises(TieLostError) as err:
        _train_hf(tmp_path, model, [ReplaceHeadAt(3), hf_callbacks.TiecheckCallback(model, check_every=10)],
                  max_steps=10, **save)
    assert str(err.value).startswith(f"1 tie lost, found at {where}:\n")
    assert str(err.value).endswith(f"checkpoint not written: {tmp_path / 'out' / f'checkpoint-{step}'} (the run "
                                   "stops before the Trainer saves it)")
    assert _checkpoints(tmp_path) == kept  # written before the tie broke


def test_trainer_checkpoint_written_while_broken_is_named(tmp_path):
    # Broken after the callback's check of step 5 and before the save: only on_save can see it.
    model = _gpt2()
    with pytest.raises(TieLostError) as err:
        _train_hf(tmp_path, model, [hf_callbacks.TiecheckCallback(model), ReplaceHeadAt(5)], max_steps=10,
                  save_strategy="steps", save_steps=5)
    folder = tmp_path / "out" / "checkpoint-5"
    msg = str(err.value)
    assert msg.startswith("1 tie lost, found at on_save at step 5:\n")
    assert "held at: step 5; lost by: on_save at step 5" in msg
    assert msg.endswith(f"\n  checkpoint written while the tie was broken: {folder}")
    assert _checkpoints(tmp_path) == ["checkpoint-5"]


def test_trainer_warn_mode_reports_a_lost_tie_once_and_every_checkpoint_written_broken(tmp_path):
    model = _gpt2()
    cb = hf_callbacks.TiecheckCallback(model, on_lost="warn", check_save=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _train_hf(tmp_path, model, [ReplaceHeadAt(3), cb], max_steps=10, save_strategy="steps",
                               save_steps=5)
    lost = [str(w.message) for w in caught if issubclass(w.category, TieLostWarning)]
    assert [m.split(":\n")[0] for m in lost] == [
        "1 tie lost, found at step 3", "1 tie lost, found at step 5", "1 tie lost, found at on_save at step 5",
        "1 tie lost, found at step 10", "1 tie lost, found at on_save at step 10"]
    out = tmp_path / "out"
    assert lost[1].endswith(f"checkpoint about to be written with the tie broken: {out / 'checkpoint-5'}")
    assert lost[2].endswith(f"checkpoint written while the tie was broken: {out / 'checkpoint-5'}")
    assert trainer.state.global_step == 10
    assert _checkpoints(tmp_path) == ["checkpoint-10", "checkpoint-5"]


def test_trainer_tie_broken_between_thinned_checks_is_found_at_train_end(tmp_path):
    model = _gpt2()
    with pytest.raises(TieLostError, match=r"^1 tie lost, found at on_train_end at step 10:\n"):
        _train_hf(tmp_path, model, [ReplaceHeadAt(3), hf_callbacks.TiecheckCallback(model, check_every=100)],
                  max_steps=10)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_check_every_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"^check_every must be a positive int \(1: every optimizer step, N: every "
                                         r"N-th\), not "):
        hf_callbacks.TiecheckCallback(check_every=bad)
    with pytest.raises(ValueError, match=r"^check_every must be a positive int"):
        lit_callbacks.TiecheckCallback(check_every=bad)


def test_saved_ties_reads_the_safetensors_alias_map_and_both_names(tmp_path):
    model = TinyLM()
    ties = TieGuard(model).ties
    (tmp_path / "alias").mkdir()
    save_model(model, str(tmp_path / "alias" / "model.safetensors"))
    [v] = runtime.saved_ties(tmp_path / "alias", ties)
    assert (v.kept, v.text) == (True, "kept: emb.weight stored once, head.weight aliased to it in the safetensors "
                                      "metadata")
    (tmp_path / "both").mkdir()
    save_file({k: t.detach().clone() for k, t in model.state_dict().items()} | {"head.weight": model.head.weight.detach()
                                                                                .clone()},
              str(tmp_path / "both" / "model.safetensors"))
    [v] = runtime.saved_ties(tmp_path / "both", ties)
    assert (v.kept, v.text) == (False, "NOT kept: emb.weight, head.weight are all stored, as 2 copies; nothing "
                                       "declares the tie, so a resumed run trains them apart")
    assert runtime.saved_ties(tmp_path, ties) is None


# --- Lightning ----------------------------------------------------------------------------------

class LitLM(pl.LightningModule):
    untie_in_setup = False

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyLM()
        self.losses: list[float] = []

    def setup(self, stage):
        if self.untie_in_setup:  # a deliberate untie where Lightning sets the module up
            self.model.head.weight = nn.Parameter(self.model.head.weight.detach().clone())

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = nn.functional.cross_entropy(self.model(x).flatten(0, 1), x.flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randint(0, 32, (4, 6), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=2)


class UntyingLitLM(LitLM):
    untie_in_setup = True


def _fit(module, callbacks=(), tmp_path=None, max_steps=2, ckpt_path=None):
    checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=checkpointing,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         default_root_dir=str(tmp_path) if tmp_path else None)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_lightning_clean_run_passes_and_changes_no_loss(tmp_path):
    cb = lit_callbacks.TiecheckCallback()
    guarded, plain = LitLM(), LitLM()
    trainer = _fit(guarded, [cb], tmp_path)
    _fit(plain, [], tmp_path)
    assert [t.names for t in cb.guard.ties] == [("model.emb.weight", "model.head.weight")]
    assert cb.guard.checks == 4  # on_fit_start, after each of the 2 optimizer steps, on_train_end
    assert cb.guard.last_ok == "on_train_end at step 2"
    assert len(guarded.losses) == 2
    assert guarded.losses == plain.losses

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    [(step, [v])] = cb.saves
    assert (step, v.kept, v.text) == (2, True, "kept: every name over one storage (torch.save writes it once)")
    resumed_cb = lit_callbacks.TiecheckCallback()
    _fit(LitLM(), [resumed_cb], tmp_path, max_steps=3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed_cb.guard.checks == 4  # on_load_checkpoint, on_fit_start, step 3, on_train_end
    assert resumed_cb.guard.last_ok == "on_train_end at step 3"


def test_lightning_untie_in_setup_is_named_with_where(tmp_path):
    with pytest.raises(TieLostError) as err:
        _fit(UntyingLitLM(), [lit_callbacks.TiecheckCallback()], tmp_path)
    msg = str(err.value)
    assert msg.startswith("1 tie lost, found at on_fit_start (after setup, configure_model and the strategy's "
                          "setup):\n  model.emb.weight, model.head.weight: 2 separate copies")
    assert "optimizer: double update: model.emb.weight, model.head.weight are all in its param groups" in msg
    assert "re-tie: model.model.head.weight = model.model.emb.weight" in msg


class ReplaceLitHeadAt(pl.Callback):
    """Replaces the head by a clone after optimizer step ``step``, as code that swaps a module mid-run does."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.model.head = copy.deepcopy(pl_module.model.head)


def _ckpts(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))


def test_lightning_tie_broken_mid_run_is_found_at_that_step_and_never_saved(tmp_path):
    every_2 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(TieLostError) as err:
        _fit(LitLM(), [ReplaceLitHeadAt(3), lit_callbacks.TiecheckCallback(), every_2], tmp_path, max_steps=10)
    msg = str(err.value)
    assert msg.startswith("1 tie lost, found at step 3:\n  model.emb.weight, model.head.weight: 2 separate copies")
    assert "    held at: on_save_checkpoint at step 2; lost by: step 3\n" in msg  # the last check that passed
    assert ("optimizer: half gradient: only model.emb.weight is in its param groups; model.head.weight never "
            "changes") in msg
    assert _ckpts(tmp_path) == ["epoch=0-step=2.ckpt"]


def test_lightning_check_every_thins_the_steps_but_never_the_check_before_a_save(tmp_path):
    every_5 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    cb = lit_callbacks.TiecheckCallback(check_every=10)
    with pytest.raises(TieLostError) as err:
        _fit(LitLM(), [ReplaceLitHeadAt(3), cb, every_5], tmp_path, max_steps=10)
    msg = str(err.value)
    assert msg.startswith("1 tie lost, found at on_save_checkpoint at step 5:\n")
    assert "held at: on_fit_start (after setup, configure_model and the strategy's setup); lost by" in msg
    assert msg.endswith("\n  checkpoint of step 5 not written (the error stops the save before Lightning writes the "
                        "file)")
    assert cb.guard.checks == 2
    assert _ckpts(tmp_path) == []


def test_lightning_warn_mode_names_each_checkpoint_written_broken_and_train_end_checks(tmp_path):
    every_5 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    cb = lit_callbacks.TiecheckCallback(on_lost="warn", check_every=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(LitLM(), [ReplaceLitHeadAt(3), cb, every_5], tmp_path, max_steps=10)
    lost = [str(w.message) for w in caught if issubclass(w.category, TieLostWarning) and "tie lost" in str(w.message)]
    assert [m.split(":\n")[0] for m in lost] == ["1 tie lost, found at on_save_checkpoint at step 5",
                                                 "1 tie lost, found at on_save_checkpoint at step 10"]
    assert lost[0].endswith("\n  checkpoint of step 5 written with the tie broken")
    assert _ckpts(tmp_path) == ["epoch=2-step=5.ckpt", "epoch=4-step=10.ckpt"]
    with pytest.raises(TieLostError, match=r"^1 tie lost, found at on_train_end at step 10:\n"):
        _fit(LitLM(), [ReplaceLitHeadAt(3), lit_callbacks.TiecheckCallback(check_every=100)], tmp_path, max_steps=10)
