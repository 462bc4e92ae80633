"""``TiecheckCallback`` for transformers' ``Trainer``: the model's ties checked at every step and before each save.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[TiecheckCallback(model)])

Checks at ``on_train_begin`` (after the Trainer has wrapped, moved and possibly materialised the
model, built the optimizer and, on a resume, loaded the checkpoint), at ``on_step_end`` after every
optimizer step (every ``check_every``-th), at ``on_train_end``, and before each save: the Trainer
calls ``on_step_end`` (and ``on_epoch_end``) after ``DefaultFlowCallback`` has set
``control.should_save`` and before it writes the checkpoint, so a tie found lost there stops the
run before a broken checkpoint reaches the disk. ``on_save`` checks again (a tie broken between
those hooks and the write is named with the checkpoint written) and says whether the checkpoint on
disk keeps each tie. Given a model, the ties are recorded when the callback is built; without one,
at the first hook that sees the model (``on_init_end``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tiecheck.runtime import SavedTie, StepWatch, TieGuard, TieLostWarning, log, saved_ties

__all__ = ["TiecheckCallback"]


class TiecheckCallback(TrainerCallback):
    """Guard the model's ties through a ``transformers.Trainer`` run.

    Args:
        model: the model to guard; None to take the Trainer's at its first hook.
        on_lost: ``"raise"`` (``TieLostError`` stops the run) or ``"warn"``.
        check_save: read the safetensors headers of each checkpoint saved and say whether it keeps the ties.
        check_every: check after every N-th optimizer step (1: every step). The checks before
            each save, at train begin and at train end run whatever N is.

    ``saves`` lists, per checkpoint saved, its folder and one ``SavedTie`` per guarded tie.
    """

    def __init__(self, model: Any = None, *, on_lost: str = "raise", check_save: bool = True, check_every: int = 1):
        self.watch = StepWatch(check_every)
        self.on_lost = on_lost
        self.check_save = check_save
        self.guard: TieGuard | None = TieGuard(model, on_lost=on_lost) if model is not None else None
        self.saves: list[tuple[str, list[SavedTie] | None]] = []

    def _guard(self, model: Any) -> TieGuard | None:
        if self.guard is None and model is not None:
            self.guard = TieGuard(model, on_lost=self.on_lost)
        return self.guard

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._guard(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        guard = self._guard(model)
        if guard is None:
            return
        where = "on_train_begin (after the Trainer set up the model and optimizer)"
        if state.global_step > 0:
            where = f"on_train_begin (after resuming at step {state.global_step})"
        self.watch.check(guard, where, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        guard = self._guard(model)
        if guard is None:
            return
        if control.should_save:
            self._before_save(guard, args, state, f"step {state.global_step}", optimizer)
        elif self.watch.due(state.global_step):
            self.watch.check(guard, f"step {state.global_step}", optimizer, repeat=False)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        guard = self._guard(model)
        if guard is not None and control.should_save:  # the epoch strategy saves next
            self._before_save(guard, args, state, f"the end of epoch {state.epoch:g} (step {state.global_step})",
                              optimizer)

    def on_evaluate(self, args, state, control, model=None, optimizer=None, **kwargs):
        guard = self._guard(model)
        if guard is not None and args.save_strategy == "best":  # a new best metric saves next (a str enum)
            self._before_save(guard, args, state, f"the evaluation at step {state.global_step}", optimizer)

    def _before_save(self, guard: TieGuard, args, state, where: str, optimizer: Any) -> None:
        folder = _checkpoint(args, state)
        note = (f"checkpoint not written: {folder} (the run stops before the Trainer saves it)"
                if guard.on_lost == "raise" else
                f"checkpoint about to be written with the tie broken: {folder}")
        self.watch.check(guard, where, optimizer, note=note)

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        guard = self._guard(model)
        if guard is None:
            return
        folder = _checkpoint(args, state)
        self.watch.check(guard, f"on_save at step {state.global_step}", optimizer,
                         note=f"checkpoint written while the tie was broken: {folder}")
        if not self.check_save or not guard.ties:
            return
        verdicts = saved_ties(folder, guard.ties) if os.path.isdir(folder) else None
        self.saves.append((folder, verdicts))
        for v in verdicts or ():
            text = f"checkpoint {folder}: {', '.join(v.names)}: {v.text}"
            if v.kept:
                log.info(text)
            else:
                warnings.warn(TieLostWarning(text), stacklevel=2)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        guard = self._guard(model)
        if guard is not None:
            self.watch.check(guard, f"on_train_end at step {state.global_step}", optimizer, repeat=False)


def _checkpoint(args, state) -> str:
    """The folder the Trainer writes the checkpoint of this step to (``Trainer._save_checkpoint``)."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
