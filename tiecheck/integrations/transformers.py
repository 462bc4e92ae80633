"""``TiecheckCallback`` for transformers' ``Trainer``: the model's ties checked where the Trainer changes it.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[TiecheckCallback(model)])

Checks at ``on_train_begin`` (after the Trainer has wrapped, moved and possibly materialised the
model, built the optimizer and, on a resume, loaded the checkpoint) and at ``on_save``, where it
also says whether the checkpoint on disk keeps each tie. Given a model, the ties are recorded when
the callback is built; without one, at the first hook that sees the model (``on_init_end``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tiecheck.runtime import SavedTie, TieGuard, TieLostWarning, log, saved_ties

__all__ = ["TiecheckCallback"]


class TiecheckCallback(TrainerCallback):
    """Guard the model's ties through a ``transformers.Trainer`` run.

    Args:
        model: the model to guard; None to take the Trainer's at its first hook.
        on_lost: ``"raise"`` (``TieLostError`` stops the run) or ``"warn"``.
        check_save: read the safetensors headers of each checkpoint saved and say whether it keeps the ties.

    ``saves`` lists, per checkpoint saved, its folder and one ``SavedTie`` per guarded tie.
    """

    def __init__(self, model: Any = None, *, on_lost: str = "raise", check_save: bool = True):
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
        guard.check(where=where, optimizer=optimizer)

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        guard = self._guard(model)
        if guard is None:
            return
        guard.check(where=f"on_save at step {state.global_step}", optimizer=optimizer)
        if not self.check_save or not guard.ties:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        verdicts = saved_ties(folder, guard.ties) if os.path.isdir(folder) else None
        self.saves.append((folder, verdicts))
        for v in verdicts or ():
            text = f"checkpoint {folder}: {', '.join(v.names)}: {v.text}"
            if v.kept:
                log.info(text)
            else:
                warnings.warn(TieLostWarning(text), stacklevel=2)
