"""What a converge run will train, and on what: ``ConvergeConfig`` as given, its defaults by device, and the
resolved ``Plan`` that ``converge.py`` runs and ``dataset.py`` reads its data by.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tiecheck import models
from tiecheck.bench import device as D
from tiecheck.bench import usermodel
from tiecheck.bench.seeds import (
    MIN_SEEDS,
)
from tiecheck.bench.settings import positive
from tiecheck.bench.usermodel import UserModel
from tiecheck.errors import TiecheckError

# Defaults: the CPU ones take about 2.5 minutes of one core (one torch thread); --quick is
# a smoke test for CI (under 30 s) on a smaller gpt-mini, and says so in its header.
_DEFAULTS = {
    "cpu": dict(model="gpt-mini", overrides={}, batch_size=4, seq_len=64, steps=200, eval_every=25, seeds=3,
                val_seqs=16, vocab_size=8192, max_chars=2_000_000, lr=1e-3),
    "cuda": dict(model="gpt2-124m", overrides={}, batch_size=16, seq_len=256, steps=1000, eval_every=100, seeds=3,
                 val_seqs=64, vocab_size=8192, max_chars=8_000_000, lr=1e-3),
    "quick": dict(model="gpt-mini", overrides={"n_layer": 2, "d_model": 64, "n_head": 2}, batch_size=4, seq_len=32,
                  steps=60, eval_every=10, seeds=3, val_seqs=16, vocab_size=2048, max_chars=400_000, lr=3e-3),
}

Progress = Callable[[int, str], None]
Factory = Callable[..., nn.Module]  # factory(tied=..., vocab_size=..., seed=...) -> module


@dataclass(frozen=True)
class ConvergeConfig:
    """What to train. ``None`` fields take the device's default (or ``--quick``'s)."""

    model: str | None = None  # a bundled decoder, a Hugging Face folder or config, or "file.py:factory"
    device: str = "cpu"
    dtype: str | None = None  # fp32 | bf16 | fp16 autocast; None: bf16 on a GPU that has it, else fp32
    steps: int | None = None
    seeds: int | None = None
    eval_every: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    vocab_size: int | None = None
    text: str | None = None  # a file or folder; None: the standard library
    tokenizer: str | None = None  # a tokenizer.json or a folder holding one
    cache: bool = True
    quick: bool = False
    seed: int = 0  # the first seed; seed i is seed + i
    lr: float | None = None
    val_seqs: int | None = None
    max_chars: int | None = None  # the standard library budget
    threads: int | None = None  # None: 1 on the CPU (steady on a shared machine), torch's own on a GPU
    overrides: Mapping[str, Any] = field(default_factory=dict)  # bundled model config changes


# ------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    model: str
    description: str
    user: UserModel | None  # the user's model (a Hugging Face folder or config, or a factory)
    overrides: Mapping[str, Any]
    dev: torch.device
    dtype: str
    steps: int
    seeds: int
    eval_every: int
    batch_size: int
    seq_len: int
    vocab_size: int
    val_seqs: int
    max_chars: int
    lr: float
    seed: int
    threads: int | None
    quick: bool

    def eval_steps(self) -> list[int]:
        """0, eval_every, 2 * eval_every, ..., and the last step."""
        return sorted(set(range(0, self.steps, self.eval_every)) | {self.steps})

    def units(self) -> int:
        return self.seeds * 2 * self.steps

    def budget(self, flops_per_step: int | None = None) -> str:
        """What the run will do, in one line, printed before it starts: runs, steps, tokens, and with the
        FLOPs of a step, the least time the device's datasheet peak allows."""
        runs = 2 * self.seeds
        tokens = runs * self.steps * self.batch_size * self.seq_len
        line = (f"{runs} training runs ({self.seeds} seeds x tied, untied) x {self.steps:,} steps of "
                f"{self.batch_size} x {self.seq_len} tokens = {tokens:,} tokens, "
                f"{len(self.eval_steps())} validation passes of {self.val_seqs} sequences per run; {self.dtype}"
                + (" autocast" if self.dtype != "fp32" else ""))
        if flops_per_step:
            total = runs * self.steps * flops_per_step
            unit, scale = next((u, k) for u, k in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("FLOP", 1))
                               if total >= k or k == 1)
            line += f"; {total / scale:,.2f} {unit} of training steps (analytic)"
            peak, _ = D.peak_tflops(self.dev, self.dtype)
            if peak:
                line += f", at least {total / (peak * 1e12):,.0f} s at this device's datasheet peak"
        return line


def resolve(cfg: ConvergeConfig) -> Plan:
    """Fill in defaults and reject bad input with one line naming the option."""
    for name in ("steps", "seeds", "eval_every", "batch_size", "seq_len", "vocab_size", "val_seqs", "max_chars",
                 "threads"):
        positive(name, getattr(cfg, name))
    dev = D.resolve_device(cfg.device)
    dtype = cfg.dtype or D.default_dtype(dev)
    D.check_dtype(dev, dtype)
    defaults = _DEFAULTS["quick" if cfg.quick else "cuda" if D.is_cuda(dev) else "cpu"]
    seeds = cfg.seeds or defaults["seeds"]
    if seeds < MIN_SEEDS:
        raise TiecheckError(f"--seeds {seeds}: the verdict is a paired interval over seeds, which needs at least "
                            f"{MIN_SEEDS} (3 or more for a useful one); use --seeds 3")
    steps = cfg.steps or defaults["steps"]
    eval_every = min(cfg.eval_every or defaults["eval_every"], steps)
    if cfg.lr is not None and not cfg.lr > 0:
        raise TiecheckError(f"learning rate {cfg.lr}: must be positive")
    name = cfg.model or defaults["model"]
    overrides = dict(defaults["overrides"]) if cfg.model is None else {}
    overrides.update(cfg.overrides)
    seq_len = cfg.seq_len or defaults["seq_len"]
    user = None
    if usermodel.is_user_model(name):
        user = usermodel.resolve_user_model(name, seed=cfg.seed, probe=False)  # the tokenizer sets its vocabulary
        description = user.description
        if user.max_positions is not None and seq_len > user.max_positions:
            raise TiecheckError(f"--seq-len {seq_len}: {name} has {user.max_positions} positions; use --seq-len "
                                f"{user.max_positions} or less")
    else:
        try:
            preset = models.get_preset(name)
        except KeyError:
            raise TiecheckError(f"--model {name}: unknown model; choose a bundled decoder "
                                f"({', '.join(p.name for p in models.list_presets() if p.kind == 'decoder')}) "
                                "or a Hugging Face folder or config, or path/to/file.py:factory") from None
        if preset.kind != "decoder":
            raise TiecheckError(f"--model {name}: an encoder-decoder; --mode converge trains a language model, "
                                "so choose a decoder such as gpt-mini or llama-mini")
        description = preset.description + (f" Changed: {config_changes(overrides)}." if overrides else "")
        max_pos = models.get_config(name, **overrides).max_positions
        if seq_len > max_pos:
            raise TiecheckError(f"--seq-len {seq_len}: {name} has {max_pos} positions; use --seq-len {max_pos} or less")
    return Plan(model=name, description=description, user=user, overrides=overrides if user is None else {},
                dev=dev, dtype=dtype, steps=steps, seeds=seeds, eval_every=eval_every,
                batch_size=cfg.batch_size or defaults["batch_size"], seq_len=seq_len,
                vocab_size=cfg.vocab_size or defaults["vocab_size"], val_seqs=cfg.val_seqs or defaults["val_seqs"],
                max_chars=cfg.max_chars or defaults["max_chars"], lr=cfg.lr or defaults["lr"], seed=cfg.seed,
                threads=cfg.threads or (None if D.is_cuda(dev) else 1), quick=cfg.quick)


def config_changes(overrides: Mapping[str, Any]) -> str:
    """A bundled model's config changes as the header shows them: ``n_layer 2, d_model 64``."""
    return ", ".join(f"{k} {v}" for k, v in overrides.items())
