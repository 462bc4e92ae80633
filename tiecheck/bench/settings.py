"""What a bench run will do: the configuration, its defaults by device, and the resolved plan.

:func:`resolve` checks a :class:`BenchConfig` against the device and the bundled presets before
anything is built, so bad input fails at once with one line; :mod:`tiecheck.bench.runner` then
runs the plan.
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from tiecheck import models
from tiecheck.bench import device as D
from tiecheck.bench import usermodel
from tiecheck.bench.results import BenchResult
from tiecheck.bench.usermodel import UserModel
from tiecheck.errors import TiecheckError, did_you_mean

MODES = ("train", "infer")
VARIANTS = ("tied", "untied")
LR, WEIGHT_DECAY = 3e-4, 0.1
N_BATCHES = 4  # distinct batches in the pool, cycled through by both variants alike

# Defaults by device: the CPU ones keep `tiecheck bench` under a minute on two cores.
_DEFAULTS = {
    "cpu": dict(model="gpt-mini", batch_size=4, seq_len=64, rounds=24, steps=3, warmup=2, decode_tokens=16),
    "cuda": dict(model="gpt2-124m", batch_size=16, seq_len=1024, rounds=20, steps=5, warmup=3, decode_tokens=64),
}

Progress = Callable[[int, str], None]  # (units done since last call, what is running)
Builder = Callable[[bool, torch.device, int], nn.Module]  # (tied, device, seed) -> model
Partial = Callable[[BenchResult], None]  # receives the result so far, before a long phase
# Vocabulary padding on a GPU: a head of 50,257 rows (GPT-2) runs on unaligned, slower matmul
# kernels; nanoGPT pads to 50,304, a multiple of 64.
GPU_VOCAB_MULTIPLE = 64
LEAK_TOLERANCE = 1 << 20  # bytes still allocated after a release that are reported


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``None`` fields take the device's default (see ``_DEFAULTS``)."""

    model: str | None = None
    mode: str = "train"
    device: str = "auto"
    dtype: str | None = None  # fp32 | bf16 | fp16; None: bf16 on a GPU that has it, else fp32
    compile: bool = False
    batch_size: int | None = None
    seq_len: int | None = None
    rounds: int | None = None
    steps: int | None = None
    warmup: int | None = None
    decode_tokens: int | None = None
    seed: int = 0
    find_max_batch: bool = False
    max_batch_cap: int = 1024
    peak_tflops: float | None = None
    threads: int | None = None  # CPU threads; None: 1 on the CPU, torch's setting on a GPU
    overrides: Mapping[str, Any] = field(default_factory=dict)  # model config changes, e.g. {"n_layer": 2}
    # Pad the model's vocabulary to a multiple of this (tokens are still drawn below the real
    # size); None: 64 on a GPU, 1 (no padding) on the CPU.
    pad_vocab: int | None = None


@dataclass(frozen=True)
class Plan:
    """A BenchConfig with every default filled in and checked."""

    model: str
    description: str
    kind: str  # decoder | encoder-decoder
    vocab_size: int
    max_positions: int
    mode: str
    dev: torch.device
    dtype: str
    compile: bool
    batch_size: int
    seq_len: int
    rounds: int
    steps: int
    warmup: int
    decode_tokens: int
    prompt_len: int
    seed: int
    find_max_batch: bool
    max_batch_cap: int
    peak_tflops: float | None
    threads: int | None  # what to set torch's intra-op threads to for the run; None: leave it
    overrides: Mapping[str, Any]
    model_vocab: int = 0  # the built model's vocabulary: vocab_size, or more when padded
    build_overrides: Mapping[str, Any] = field(default_factory=dict)  # overrides plus the padded vocab_size
    user: UserModel | None = None  # the user's own model (a Hugging Face folder or a factory)

    @property
    def padded(self) -> bool:
        return self.model_vocab > self.vocab_size

    @property
    def decodes(self) -> bool:
        """Greedy decoding with the KV cache: the bundled decoders' own ``generate``."""
        return self.mode == "infer" and self.kind == "decoder" and self.user is None

    def builder(self) -> Builder:
        """(tied, device, seed) -> the model this plan measures."""
        if self.user is None:
            return bundled_builder(self.model, self.build_overrides)
        user, vocab = self.user, self.model_vocab if self.padded else None
        return lambda tied, dev, seed: usermodel.build(user, tied, dev, seed, vocab_size=vocab)

    def call(self, fn: Callable) -> Callable:
        """What a step calls: ``fn`` itself for a bundled model; for the user's, an adapter taking
        ``(idx, targets=None)`` whose loss is the bench's own cross-entropy of the logits."""
        return fn if self.user is None else usermodel.LMCall(fn, hf=self.user.hf)

    def units(self) -> int:
        """Progress units: one per step, warm-up included, and one per decoding call."""
        per_variant = self.warmup + self.rounds * self.steps + (self.rounds if self.decodes else 0)
        return 2 * per_variant


def positive(name: str, value: int | None) -> None:
    """A TiecheckError naming the option unless ``value`` is None or a positive integer."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise TiecheckError(f"--{name.replace('_', '-')} {value}: must be a positive integer")


def resolve(cfg: BenchConfig, builder: Builder | None = None) -> Plan:
    """Fill in defaults and reject bad input with one line naming the option."""

    if cfg.mode not in MODES:
        raise TiecheckError(f"--mode {cfg.mode}: choose one of {', '.join(MODES)}")
    for name in ("batch_size", "seq_len", "rounds", "steps", "warmup", "decode_tokens", "max_batch_cap", "threads",
                 "pad_vocab"):
        positive(name, getattr(cfg, name))
    if cfg.peak_tflops is not None and not cfg.peak_tflops > 0:
        raise TiecheckError(f"--peak-tflops {cfg.peak_tflops}: must be a positive number of TFLOP/s")
    dev = D.resolve_device(cfg.device)
    defaults = _DEFAULTS["cuda" if D.is_cuda(dev) else "cpu"]
    name = cfg.model or defaults["model"]
    user = _user_model(cfg, name)
    if user is None:
        try:
            preset = models.get_preset(name)
        except KeyError:
            guess = did_you_mean(name, models.PRESETS).lstrip("; ")
            raise TiecheckError(f"--model {name}: unknown model; {guess + ' (' if guess else ''}choose one of: "
                                f"{', '.join(models.PRESETS)}{')' if guess else ''}; or give a Hugging Face "
                                "folder or config.json, or path/to/file.py:factory") from None
        try:
            config = models.get_config(name, **cfg.overrides)
        except (TypeError, ValueError) as e:
            raise TiecheckError(f"model overrides {dict(cfg.overrides)}: {e}") from None
        description, kind, vocab_size, max_pos = preset.description, preset.kind, config.vocab_size, \
            config.max_positions
    else:
        description, kind, vocab_size, max_pos = user.description, "decoder", user.vocab_size, user.max_positions
    if cfg.find_max_batch and not D.is_cuda(dev):
        raise TiecheckError("--find-max-batch needs a CUDA GPU: it fills the device memory to find the largest "
                            "batch, and the CPU has no fixed device memory to fill; run it with --device cuda")
    dtype = cfg.dtype or D.default_dtype(dev)
    D.check_dtype(dev, dtype)
    rounds = cfg.rounds or defaults["rounds"]
    if rounds < 2:
        raise TiecheckError(f"--rounds {rounds}: at least 2, so each variant runs both first and second")
    # torch.compile compiles forward and backward in the first steps and may recompile once
    # more as guards settle: give it more untimed steps.
    warmup = cfg.warmup or (max(defaults["warmup"], 5) if cfg.compile else defaults["warmup"])
    if cfg.mode == "train" and warmup < 2:
        raise TiecheckError(f"--warmup {warmup}: training needs at least 2 warm-up steps (AdamW allocates its "
                            "state in the first, and the peak memory is read in the warm-up)")
    seq_len = cfg.seq_len or min(defaults["seq_len"], max_pos or defaults["seq_len"])
    if max_pos is not None and seq_len > max_pos:
        raise TiecheckError(f"--seq-len {seq_len}: {name} has {max_pos} positions; use --seq-len {max_pos} or less")
    decode_tokens = cfg.decode_tokens or defaults["decode_tokens"]
    # Decoding starts from half a sequence and may not run past the model's positions.
    prompt_len = max(1, seq_len // 2)
    if max_pos is not None:
        decode_tokens = min(decode_tokens, max_pos - prompt_len + 1)
    if user is not None and not user.hf and cfg.pad_vocab not in (None, 1):
        raise TiecheckError(f"--pad-vocab {cfg.pad_vocab}: {name} builds its own vocabulary; pad it in the factory")
    multiple = cfg.pad_vocab or (GPU_VOCAB_MULTIPLE if D.is_cuda(dev) and (user is None or user.hf) else 1)
    model_vocab = -(-vocab_size // multiple) * multiple
    build_overrides = dict(cfg.overrides)
    if model_vocab != vocab_size:
        build_overrides["vocab_size"] = model_vocab
    return Plan(model=name, description=description, kind=kind, vocab_size=vocab_size,
                max_positions=max_pos or seq_len, mode=cfg.mode, dev=dev, dtype=dtype, compile=cfg.compile,
                batch_size=cfg.batch_size or defaults["batch_size"], seq_len=seq_len, rounds=rounds,
                steps=cfg.steps or defaults["steps"], warmup=warmup, decode_tokens=decode_tokens,
                prompt_len=prompt_len, seed=cfg.seed, find_max_batch=cfg.find_max_batch,
                max_batch_cap=cfg.max_batch_cap, peak_tflops=cfg.peak_tflops,
                # One CPU thread by default: the tied/untied difference is per-step work, not
                # parallel scaling, and a lone thread never waits at an operator's barrier for a
                # sibling that another process has descheduled -- on a shared two-core machine
                # that wait made steps 10x slower at random and the intervals useless.
                threads=cfg.threads or (None if D.is_cuda(dev) else 1), overrides=dict(cfg.overrides),
                model_vocab=model_vocab, build_overrides=build_overrides, user=user)


def _user_model(cfg: BenchConfig, name: str) -> UserModel | None:
    """The user's model when ``name`` is a path or a spec; None for a bundled name."""
    if not usermodel.is_user_model(name):
        return None
    if cfg.overrides:
        raise TiecheckError(f"model overrides {dict(cfg.overrides)}: only for bundled models; change "
                            f"{name} itself")
    return usermodel.resolve_user_model(name, seed=cfg.seed)


def bundled_builder(name: str, overrides: Mapping[str, Any] = {}) -> Builder:

    return lambda tied, dev, seed: models.build(name, tied=tied, device=dev, seed=seed, **overrides)


def order_of_round(r: int) -> tuple[str, str]:
    """A B, B A, A B, B A, ...: each variant first in half the rounds."""
    return VARIANTS if r % 2 == 0 else VARIANTS[::-1]


def config_repr(cfg: BenchConfig) -> str:
    """The call that reproduces ``cfg`` from Python, naming only what differs from the defaults."""
    def default(f):
        return f.default_factory() if f.default_factory is not MISSING else f.default

    changed = [f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg) if getattr(cfg, f.name) != default(f)]
    return f"run_bench(BenchConfig({', '.join(changed)}))"


def command_line(argv: list[str] | None = None) -> str:
    """The ``tiecheck`` command line that reproduces this run (``sys.argv`` by default)."""
    return shlex.join(["tiecheck", *(sys.argv[1:] if argv is None else argv)])
