"""``TiecheckCallback`` in a real ``lightning.Trainer``, along the paths the training tests do not take:
a module built in ``configure_model``, gradient accumulation, two optimizers, a resumed run,
what it logs for a checkpoint that keeps the tie and where its warning points.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from tiecheck.runtime import TieLostError, TieLostWarning

pl = pytest.importorskip("lightning.pytorch")
# Imported plainly once lightning is there: a packaging break must fail these tests, not skip them.
from tiecheck.integrations import lightning as lit_callbacks  # noqa: E402 - after the importorskip that guards it

from support.guards import record_checks  # noqa: E402 - idem
from support.lit import LitEmbHead  # noqa: E402 - idem
from support.models import EmbHead  # noqa: E402 - idem

TIE = ("model.emb.weight", "model.head.weight")


class BuiltInConfigureModel(LitEmbHead):
    """No parameters until ``configure_model``, as a module built for FSDP or on meta does."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        self.batches = 4

    def configure_model(self):
        if not hasattr(self, "model"):
            self.model = EmbHead()


class TwoOptimizers(LitEmbHead):
    """Manual optimization with an optimizer per part: no single optimizer to describe."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.proj = nn.Linear(8, 8)

    def setup(self, stage):
        self.model.head.weight = nn.Parameter(self.model.head.weight.detach().clone())

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = nn.functional.cross_entropy(self.model.head(self.proj(self.model.emb(x))).flatten(0, 1), x.flatten())
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=1e-2), torch.optim.SGD(self.proj.parameters(), lr=1e-2)


def _trainer(tmp_path, callbacks, max_steps=2, **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                      default_root_dir=str(tmp_path), **kw)


def test_star_import_brings_the_callback_only():
    namespace: dict = {}
    exec("from tiecheck.integrations.lightning import *", namespace)  # what a user's star import binds
    assert sorted(set(namespace) - {"__builtins__"}) == ["TiecheckCallback"]


def test_ties_of_a_module_built_in_configure_model_are_recorded_at_fit_start(tmp_path):
    cb = lit_callbacks.TiecheckCallback()
    _trainer(tmp_path, [cb]).fit(BuiltInConfigureModel())
    assert [t.names for t in cb.guard.ties] == [TIE]
    assert cb.guard.checks == 4  # on_fit_start, steps 1 and 2, on_train_end


def test_with_accumulation_each_optimizer_step_is_checked_once(tmp_path):
    module = LitEmbHead(batches=4)
    cb = lit_callbacks.TiecheckCallback(module)
    seen = record_checks(cb.guard)
    _trainer(tmp_path, [cb], accumulate_grad_batches=2).fit(module)
    assert seen == ["on_fit_start (after setup, configure_model and the strategy's setup)", "step 1", "step 2",
                    "on_train_end at step 2"]


def test_with_two_optimizers_the_message_describes_none(tmp_path):
    with pytest.raises(TieLostError) as err:
        _trainer(tmp_path, [lit_callbacks.TiecheckCallback()]).fit(TwoOptimizers())
    msg = str(err.value)
    assert msg.startswith("1 tie lost, found at on_fit_start")
    assert "optimizer:" not in msg
    assert "then build the optimizer again" not in msg


def test_a_kept_checkpoint_is_logged_and_a_resumed_run_is_checked_on_load(tmp_path, caplog):
    module = LitEmbHead()
    cb = lit_callbacks.TiecheckCallback(module)
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TieLostWarning)
        with caplog.at_level(logging.INFO, logger="tiecheck"):
            trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert [r.getMessage() for r in caplog.records if r.name == "tiecheck"] == [
        f"checkpoint at step 2: {', '.join(TIE)}: kept: every name over one storage (torch.save writes it once)"]

    resumed = LitEmbHead()
    cb2 = lit_callbacks.TiecheckCallback(resumed)
    seen = record_checks(cb2.guard)
    _trainer(tmp_path, [cb2], max_steps=3).fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert seen == ["on_load_checkpoint (after the weights were restored)",
                    "on_fit_start (after setup, configure_model and the strategy's setup)", "step 3",
                    "on_train_end at step 3"]


class DropHead(pl.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        del checkpoint["state_dict"]["model.head.weight"]


def test_a_checkpoint_that_loses_the_tie_warns_from_lightnings_hook_caller(tmp_path):
    module = LitEmbHead()
    cb = lit_callbacks.TiecheckCallback(module)
    trainer = _trainer(tmp_path, [DropHead(), cb], max_steps=1)
    trainer.fit(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    [w] = [w for w in caught if issubclass(w.category, TieLostWarning)]
    assert str(w.message).startswith("checkpoint at step 1: model.emb.weight, model.head.weight: NOT kept: only ")
    # stacklevel=2: the warning points into Lightning's _call_callbacks_on_save_checkpoint, the frame that
    # called the hook.
    caller = pl.trainer.call._call_callbacks_on_save_checkpoint
    lines, first = inspect.getsourcelines(caller)
    assert w.filename == inspect.getsourcefile(caller)
    assert first <= w.lineno < first + len(lines)


def test_saved_tensors_on_meta_or_not_tensors_are_never_one_storage():
    with torch.device("meta"):
        w = torch.empty(4, 2)
    assert lit_callbacks._storage(w) is None
    assert lit_callbacks._storage([1.0]) is None
    assert not lit_callbacks._saved(("a", "b"), {"a": w, "b": w}).kept
    assert not lit_callbacks._saved(("a", "b"), {"a": 1.0, "b": 1.0}).kept
    shared = torch.ones(4, 2)
    assert lit_callbacks._saved(("a", "b"), {"a": shared, "b": shared}).kept


def test_dtensors_over_one_local_shard_are_one_storage(tmp_path):
    """A state dict of DTensors (FSDP2, ModelParallelStrategy) is read by its local shards, with no gather."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(torch.ones(4, 2), mesh, [Replicate()])
        same = DTensor.from_local(w.to_local(), mesh, [Replicate()], run_check=False)  # another DTensor, one shard
        apart = distribute_tensor(torch.ones(4, 2), mesh, [Replicate()])
        assert lit_callbacks._saved(("a", "b"), {"a": w, "b": same}).kept
        assert not lit_callbacks._saved(("a", "b"), {"a": w, "b": apart}).kept
    finally:
        dist.destroy_process_group()


class NoParameters(pl.LightningModule):
    """State in buffers alone (a frozen lookup table); the one tensor trained lives outside the module, so the
    module has no Parameter and no tie to guard, while optimizer steps are taken."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.register_buffer("table", torch.ones(4))
        self.outside = [nn.Parameter(torch.zeros(1))]  # in a list: not registered with the module

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward((self.outside[0] * self.table.sum()).sum())
        opt.step()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.outside, lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)

    val_dataloader = train_dataloader


def test_a_module_without_parameters_is_guarded_with_no_ties_at_every_hook(tmp_path):
    """Every hook builds the guard if none is built yet, parameters or not; here none ever exist."""
    module = NoParameters()
    assert list(module.parameters()) == []
    cb = lit_callbacks.TiecheckCallback()
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(module)
    assert cb.guard.ties == []
    assert cb.guard.checks == 4  # on_fit_start, steps 1 and 2, on_train_end

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert cb.saves == [(2, [])]

    cb2 = lit_callbacks.TiecheckCallback()
    _trainer(tmp_path, [cb2], max_steps=3).fit(NoParameters(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb2.guard.ties == []
    assert cb2.guard.checks == 4  # on_load_checkpoint, on_fit_start, step 3, on_train_end

    # Saved after validating alone: no fit, so the save is the guard's first hook since setup.
    cb3 = lit_callbacks.TiecheckCallback()
    validated = _trainer(tmp_path, [cb3])
    validated.validate(NoParameters(), verbose=False)
    assert cb3.guard is None
    validated.save_checkpoint(tmp_path / "validated.ckpt")
    assert cb3.saves == [(0, [])]


class UntieAfterFirstStep(pl.Callback):
    """Gives the head its own copy once the first optimizer step is over, as a swapped module does."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and pl_module.model.head.weight is pl_module.model.emb.weight:
            pl_module.model.head.weight = nn.Parameter(pl_module.model.emb.weight.detach().clone())


def test_in_warn_mode_a_lost_tie_is_reported_once_not_at_every_later_step(tmp_path):
    module = LitEmbHead(batches=4)
    cb = lit_callbacks.TiecheckCallback(module, on_lost="warn")
    seen = record_checks(cb.guard)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [UntieAfterFirstStep(), cb], max_steps=4).fit(module)
    lost = [str(w.message) for w in caught if issubclass(w.category, TieLostWarning)]
    assert seen == ["on_fit_start (after setup, configure_model and the strategy's setup)", "step 1"]
    assert len(lost) == 1
    assert lost[0].startswith("1 tie lost, found at step 1:")
