"""``TiecheckCallback`` for Lightning: the module's ties checked at every step and before each save.

    trainer = lightning.Trainer(callbacks=[TiecheckCallback()])

Checks at ``on_fit_start`` (after ``setup``, ``configure_model``, the strategy's device move and
wrapping, and the optimizers), at ``on_train_batch_end`` after every optimizer step (every
``check_every``-th), at ``on_train_end``, at ``on_save_checkpoint`` and at ``on_load_checkpoint``
(after the weights were restored). Lightning calls ``on_save_checkpoint`` while it builds the
checkpoint, before the file is written, so a tie found lost there stops the run before a broken
checkpoint reaches the disk; the callback also says whether the saved state dict keeps each tie
(both names over one storage). Given a module, the ties are recorded when the callback is built;
without one, at ``setup``, before the module's own ``setup`` and ``configure_model`` run (or at
``on_fit_start`` when the module has no parameters yet).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from tiecheck.runtime import SavedTie, StepWatch, TieGuard, TieLostWarning, log

__all__ = ["TiecheckCallback"]


def _storage(t: Any) -> tuple[int, int] | None:
    """Where a saved tensor's bytes start; a DTensor by its local shard (no gather)."""
    if not isinstance(t, torch.Tensor):
        return None
    local = getattr(t, "_local_tensor", None)
    t = local if isinstance(local, torch.Tensor) else t
    if t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr(), t.storage_offset()
    except (RuntimeError, NotImplementedError, TypeError):  # fake or functional tensors own no storage
        return None


class TiecheckCallback(Callback):
    """Guard a LightningModule's ties through a ``lightning.Trainer`` run.

    Args:
        model: the module to guard; None to take the Trainer's at its first hook.
        on_lost: ``"raise"`` (``TieLostError`` stops the run) or ``"warn"``.
        check_every: check after every N-th optimizer step (1: every step). The checks before
            each save, at fit start and at train end run whatever N is.

    ``saves`` lists, per checkpoint saved, its step and one ``SavedTie`` per guarded tie.
    """

    def __init__(self, model: Any = None, *, on_lost: str = "raise", check_every: int = 1):
        self.watch = StepWatch(check_every)
        self._last_step = -1  # the optimizer step last checked: a batch that only accumulates is not a step
        self.on_lost = on_lost
        self.guard: TieGuard | None = TieGuard(model, on_lost=on_lost) if model is not None else None
        self.saves: list[tuple[int, list[SavedTie]]] = []

    def _guard(self, pl_module: Any, *, empty_ok: bool) -> TieGuard | None:
        if self.guard is None and (empty_ok or any(True for _ in pl_module.parameters())):
            self.guard = TieGuard(pl_module, on_lost=self.on_lost)
        return self.guard

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._guard(pl_module, empty_ok=False)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.watch.check(self._guard(pl_module, empty_ok=True),
                         "on_fit_start (after setup, configure_model and the strategy's setup)", _one_optimizer(trainer))

    def on_train_start(self, trainer, pl_module) -> None:
        # The step the loop starts from (0, or the step a resumed run restored): a batch that ends
        # on it only accumulated, so it is no optimizer step to check.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step and self.watch.due(step):
            self._last_step = step
            self.watch.check(self._guard(pl_module, empty_ok=True), f"step {step}", _one_optimizer(trainer),
                             repeat=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self.watch.check(self._guard(pl_module, empty_ok=True), f"on_train_end at step {trainer.global_step}",
                         _one_optimizer(trainer), repeat=False)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        guard = self._guard(pl_module, empty_ok=True)
        step = trainer.global_step
        note = (f"checkpoint of step {step} not written (the error stops the save before Lightning writes the file)"
                if guard.on_lost == "raise" else f"checkpoint of step {step} written with the tie broken")
        self.watch.check(guard, f"on_save_checkpoint at step {step}", _one_optimizer(trainer), note=note)
        state = checkpoint.get("state_dict") or {}
        verdicts = [_saved(tie.names, state) for tie in guard.ties]
        self.saves.append((trainer.global_step, verdicts))
        for v in verdicts:
            text = f"checkpoint at step {trainer.global_step}: {', '.join(v.names)}: {v.text}"
            if v.kept:
                log.info(text)
            else:
                warnings.warn(TieLostWarning(text), stacklevel=2)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.watch.check(self._guard(pl_module, empty_ok=True), "on_load_checkpoint (after the weights were restored)",
                         _one_optimizer(trainer))


def _one_optimizer(trainer) -> Any:
    optimizers = getattr(trainer, "optimizers", None) or []
    return optimizers[0] if len(optimizers) == 1 else None


def _saved(names: tuple[str, ...], state: dict) -> SavedTie:
    stored = tuple(n for n in names if n in state)
    places = {_storage(state[n]) for n in stored}
    if len(stored) == len(names) and len(places) == 1 and None not in places:
        return SavedTie(names, True, stored, "kept: every name over one storage (torch.save writes it once)")
    if len(stored) == 1:
        return SavedTie(names, False, stored, f"NOT kept: only {stored[0]} is in the state dict; loading it "
                                              f"strictly fails, and non-strictly leaves the others as they are")
    if not stored:
        return SavedTie(names, False, stored, "NOT kept: none of the names is in the state dict")
    return SavedTie(names, False, stored, f"NOT kept: {', '.join(stored)} are stored as separate copies")
