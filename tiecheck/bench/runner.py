"""The bench protocol: build both variants, warm up, run interleaved rounds, check, collect.

Schedule. Round r runs ``steps`` steps of each variant back to back, tied first in even
rounds and untied first in odd ones: A B | B A | A B | B A ... A slow drift (clock, thermals,
another process) then hits both variants equally often in first and second position, and the
paired bootstrap over rounds cancels it in their ratio.

Memory. Both variants stay resident during the rounds (interleaving needs them), so peak
memory is taken during each variant's own warm-up: the peak allocated above what was resident
before, plus its own weights. The warm-up runs at least two steps, so the peak covers a step
with the AdamW moments already allocated.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from tiecheck import __version__, models
from tiecheck.bench import device as D
from tiecheck.bench.flops import FlopsShape, flops_shape, step_flops
from tiecheck.bench.protocol import (
    PHASES,
    Batch,
    Variant,
    diverged,
    identical_weights,
    make_batches,
    optimizer_state_bytes,
    param_count,
    still_tied,
    tie_groups,
    weight_bytes,
)
from tiecheck.bench.results import BenchResult, VariantRecord
from tiecheck.bench.stats import MIN_ROUNDS_FOR_VERDICT
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


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``None`` fields take the device's default (see ``_DEFAULTS``)."""

    model: Optional[str] = None
    mode: str = "train"
    device: str = "auto"
    dtype: Optional[str] = None  # fp32 | bf16 | fp16; None: bf16 on a GPU that has it, else fp32
    compile: bool = False
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    rounds: Optional[int] = None
    steps: Optional[int] = None
    warmup: Optional[int] = None
    decode_tokens: Optional[int] = None
    seed: int = 0
    find_max_batch: bool = False
    max_batch_cap: int = 1024
    peak_tflops: Optional[float] = None
    threads: Optional[int] = None  # CPU threads; None: 1 on the CPU, torch's setting on a GPU
    overrides: Mapping[str, Any] = field(default_factory=dict)  # model config changes, e.g. {"n_layer": 2}


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
    peak_tflops: Optional[float]
    threads: Optional[int]  # what to set torch's intra-op threads to for the run; None: leave it
    overrides: Mapping[str, Any]

    @property
    def decodes(self) -> bool:
        return self.mode == "infer" and self.kind == "decoder"

    def units(self) -> int:
        """Progress units: one per step, warm-up included, and one per decoding call."""
        per_variant = self.warmup + self.rounds * self.steps + (self.rounds if self.decodes else 0)
        return 2 * per_variant


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise TiecheckError(f"--{name.replace('_', '-')} {value}: must be a positive integer")


def resolve(cfg: BenchConfig, builder: Optional[Builder] = None) -> Plan:
    """Fill in defaults and reject bad input with one line naming the option."""

    if cfg.mode not in MODES:
        raise TiecheckError(f"--mode {cfg.mode}: choose one of {', '.join(MODES)}")
    for name in ("batch_size", "seq_len", "rounds", "steps", "warmup", "decode_tokens", "max_batch_cap", "threads"):
        _positive(name, getattr(cfg, name))
    if cfg.peak_tflops is not None and not cfg.peak_tflops > 0:
        raise TiecheckError(f"--peak-tflops {cfg.peak_tflops}: must be a positive number of TFLOP/s")
    dev = D.resolve_device(cfg.device)
    defaults = _DEFAULTS["cuda" if D.is_cuda(dev) else "cpu"]
    name = cfg.model or defaults["model"]
    try:
        preset = models.get_preset(name)
    except KeyError:
        guess = did_you_mean(name, models.PRESETS).lstrip("; ")
        raise TiecheckError(f"--model {name}: unknown model; {guess + ' (' if guess else ''}choose one of: "
                            f"{', '.join(models.PRESETS)}{')' if guess else ''}") from None
    try:
        config = models.get_config(name, **cfg.overrides)
    except (TypeError, ValueError) as e:
        raise TiecheckError(f"model overrides {dict(cfg.overrides)}: {e}") from None
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
    max_pos = config.max_positions
    seq_len = cfg.seq_len or min(defaults["seq_len"], max_pos)
    if seq_len > max_pos:
        raise TiecheckError(f"--seq-len {seq_len}: {name} has {max_pos} positions; use --seq-len {max_pos} or less")
    decode_tokens = cfg.decode_tokens or defaults["decode_tokens"]
    # Decoding starts from half a sequence and may not run past the model's positions.
    prompt_len = max(1, seq_len // 2)
    decode_tokens = min(decode_tokens, max_pos - prompt_len + 1)
    return Plan(model=name, description=preset.description, kind=preset.kind, vocab_size=config.vocab_size,
                max_positions=max_pos, mode=cfg.mode, dev=dev, dtype=dtype, compile=cfg.compile,
                batch_size=cfg.batch_size or defaults["batch_size"], seq_len=seq_len, rounds=rounds,
                steps=cfg.steps or defaults["steps"], warmup=warmup, decode_tokens=decode_tokens,
                prompt_len=prompt_len, seed=cfg.seed, find_max_batch=cfg.find_max_batch,
                max_batch_cap=cfg.max_batch_cap, peak_tflops=cfg.peak_tflops,
                # One CPU thread by default: the tied/untied difference is per-step work, not
                # parallel scaling, and a lone thread never waits at an operator's barrier for a
                # sibling that another process has descheduled -- on a shared two-core machine
                # that wait made steps 10x slower at random and the intervals useless.
                threads=cfg.threads or (None if D.is_cuda(dev) else 1), overrides=dict(cfg.overrides))


def bundled_builder(name: str, overrides: Mapping[str, Any] = {}) -> Builder:  # noqa: B006 - read only

    return lambda tied, dev, seed: models.build(name, tied=tied, device=dev, seed=seed, **overrides)


def order_of_round(r: int) -> tuple[str, str]:
    """A B, B A, A B, B A, ...: each variant first in half the rounds."""
    return VARIANTS if r % 2 == 0 else VARIANTS[::-1]


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

@dataclass
class _State:
    plan: Plan
    variants: dict[str, Variant] = field(default_factory=dict)
    records: dict[str, VariantRecord] = field(default_factory=dict)
    groups: list[tuple[str, ...]] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    optimizer_label: str = ""
    shape: Optional[FlopsShape] = None
    progress: Progress = lambda n, label: None
    host_load: Optional[str] = None


_FLAG = re.compile(r"^--([a-z][a-z-]*) (\S+):")


def run_bench(cfg: BenchConfig = BenchConfig(), *, progress: Optional[Progress] = None,
              build: Optional[Builder] = None, command: Optional[str] = None) -> BenchResult:
    """Measure the tied and untied variants of ``cfg.model`` and return the result.

    ``build(tied, device, seed)`` replaces the bundled model builder: it must return the
    preset's model (with ``cfg.overrides``) or one with the same config and forward contract;
    ``command`` is shown in the header.
    """
    try:
        plan = resolve(cfg)
    except TiecheckError as e:
        # resolve() names options as the command line does; a Python caller set BenchConfig fields.
        raise TiecheckError(_FLAG.sub(lambda m: f"BenchConfig({m.group(1).replace('-', '_')}={m.group(2)}):",
                                      str(e), count=1)) from None
    threads = torch.get_num_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    try:
        return _run(plan, cfg, progress, build, command)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(plan: Plan, cfg: BenchConfig, progress: Optional[Progress], build: Optional[Builder],
         command: Optional[str]) -> BenchResult:
    st = _State(plan=plan, host_load=_host_load())
    if progress is not None:
        st.progress = progress
    builder = build or bundled_builder(plan.model, plan.overrides)

    _build_variants(st, builder)
    _make_pool(st)
    for name in VARIANTS:
        _warm_up(st, name)
    _same_first_loss(st)
    _rounds(st)
    _checks(st)
    if plan.find_max_batch:
        _find_max_batch(st, builder)
    for v in st.variants.values():
        if v.module is not None:
            v.release()
    del st.variants
    D.release_memory(plan.dev)  # free the models' memory now, not when the caller lets go of the result
    return _result(st, cfg, command)


def _host_load() -> Optional[str]:
    # Other processes on the host slow the measured steps (on a GPU, their launches): a reader
    # of the result should know how busy the machine was.
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return None
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs at the start"


def _build_variants(st: _State, builder: Builder) -> None:
    plan = st.plan
    for name in VARIANTS:
        rec = st.records[name] = VariantRecord(name=name)
        with D.catch_oom() as caught:
            module = builder(name == "tied", plan.dev, plan.seed)
            if plan.mode == "infer":
                module.eval()
            fn = torch.compile(module) if plan.compile else module
            v = Variant(name=name, module=module, fn=fn, dev=plan.dev, dtype=plan.dtype, mode=plan.mode)
            if plan.mode == "train":
                v.optimizer, st.optimizer_label = D.make_adamw(module.parameters(), plan.dev, LR, WEIGHT_DECAY)
                v.scaler = D.grad_scaler(plan.dev, plan.dtype)
            st.variants[name] = v
            rec.params = param_count(module)
            rec.weight_bytes = weight_bytes(module)
        if caught:
            st.variants.pop(name, None)
            _fail(st, name, f"out of memory building the model ({caught[0]})")
    tied, untied = st.variants.get("tied"), st.variants.get("untied")
    if tied is not None:
        st.groups = tie_groups(tied.module)
        st.shape = flops_shape(tied.module)
    if untied is not None:
        st.shape = st.shape or flops_shape(untied.module)
    if tied is not None and untied is not None:
        # The protocol's premise: the two models differ in the tie and nothing else.
        st.checks["identical start (same values by name; tied shares, untied copies)"] = bool(
            st.groups and not tie_groups(untied.module) and identical_weights(tied.module, untied.module))
        if flops_shape(untied.module) != st.shape:
            st.notes.append("the variants' matmul parameters differ; FLOPs taken from the tied variant")


def _fail(st: _State, name: str, why: str) -> None:
    rec = st.records[name]
    rec.status = why
    rec.samples = {}
    rec.decode_samples = None
    v = st.variants.get(name)
    if v is not None:
        v.status = why
        v.release()
    D.cleanup_after_oom(st.plan.dev)


def _make_pool(st: _State) -> None:
    plan = st.plan
    with D.catch_oom() as caught:
        st.batches = make_batches(plan.kind, plan.vocab_size, plan.batch_size, plan.seq_len, N_BATCHES, plan.seed,
                                  plan.dev)
    if caught:
        for name in list(st.variants):
            _fail(st, name, f"out of memory: the batch of {plan.batch_size} x {plan.seq_len} tokens itself does "
                            f"not fit ({caught[0]}); use a smaller --batch-size")


def _batch(st: _State, v: Variant) -> Batch:
    # Indexed by the variant's own step count, so both see the same batches in the same order.
    return st.batches[v.steps_done % len(st.batches)]


def _warm_up(st: _State, name: str) -> None:
    v = st.variants.get(name)
    if v is None or not v.ok:
        return
    plan, rec = st.plan, st.records[name]
    before = D.memory_allocated(plan.dev)
    D.reset_peak_memory(plan.dev)
    with D.catch_oom() as caught:
        timer = D.PhaseTimer(plan.dev)
        timer.mark()
        for i in range(plan.warmup):
            st.progress(0, f"warm-up {name}")
            v.step(_batch(st, v), timer, capture_grads=i == plan.warmup - 1)
            st.progress(1, f"warm-up {name}")
        timer.intervals_ms()  # waits for the device; warm-up times are not kept
        peak = D.max_memory_allocated(plan.dev)
    if caught:
        _fail(st, name, f"out of memory at batch {plan.batch_size} x {plan.seq_len} in warm-up ({caught[0]}); "
                        "try a smaller --batch-size, or --find-max-batch")
        return
    if peak is not None and before is not None:
        rec.peak_bytes = peak - before + rec.weight_bytes
    rec.grad_bytes = v.grad_bytes
    if v.optimizer is not None:
        rec.optimizer_bytes = optimizer_state_bytes(v.optimizer)
    if v.losses:
        rec.loss_first = float(v.losses[0])


def _same_first_loss(st: _State) -> None:
    # Same weights, same batch: the first forward must agree, or the variants did not start
    # alike. Not bit for bit: torch.compile fuses the two graphs differently, and in 16-bit
    # precision a reordered sum moves the loss in its third or fourth digit.
    a, b = st.records["tied"].loss_first, st.records["untied"].loss_first
    if a is not None and b is not None:
        rtol = 1e-4 if st.plan.dtype == "fp32" else 1e-2
        st.checks[f"same first loss (within {rtol:g} relative)"] = abs(a - b) <= rtol * max(1.0, abs(b))


def _rounds(st: _State) -> None:
    plan = st.plan
    phases = PHASES[plan.mode]
    for name, rec in st.records.items():
        if rec.ok:
            rec.samples = {p: [] for p in phases}
            rec.decode_samples = [] if plan.decodes else None
    prompt = None
    if plan.decodes and st.batches:
        prompt = st.batches[0].inputs[0][:, :plan.prompt_len]
    for r in range(plan.rounds):
        for name in order_of_round(r):
            v = st.variants.get(name)
            if v is None or not v.ok:
                continue
            st.order.append(name)
            label = f"round {r + 1}/{plan.rounds} {name}"
            with D.catch_oom() as caught:
                timer = D.PhaseTimer(plan.dev)
                timer.mark()
                for _ in range(plan.steps):
                    v.step(_batch(st, v), timer)
                    st.progress(1, label)
                ms = timer.intervals_ms()
                rec = st.records[name]
                for i, p in enumerate(phases):
                    rec.samples[p].append(ms[i::len(phases)])
                if prompt is not None:
                    timer.mark()
                    v.generate(prompt, plan.decode_tokens)
                    timer.mark()
                    rec.decode_samples.append(timer.intervals_ms())
                    st.progress(1, label)
            if caught:
                _fail(st, name, f"out of memory in round {r + 1} ({caught[0]})")


def _checks(st: _State) -> None:
    plan = st.plan
    tied, untied = st.variants.get("tied"), st.variants.get("untied")
    if tied is not None and tied.ok:
        st.checks[f"tied still tied after {tied.steps_done} steps (one storage, equal values)"] = \
            still_tied(tied.module, st.groups)
    if untied is not None and untied.ok and plan.mode == "train" and st.groups:
        st.checks[f"untied diverged after {untied.steps_done} steps (separate storage, different values)"] = \
            diverged(untied.module, st.groups)
    for name, v in st.variants.items():
        if v.ok and plan.mode == "train":
            rec = st.records[name]
            st.checks[f"{name} losses finite"] = bool(v.losses_finite())
            rec.loss_last = float(v.losses[-1]) if v.losses else None
            rec.steps = v.steps_done


# ------------------------------------------------------------------------------------------
# --find-max-batch
# ------------------------------------------------------------------------------------------

def _fits(st: _State, v: Variant, batch_size: int, probe_steps: int = 3) -> bool:
    """Whether ``probe_steps`` steps at ``batch_size`` run; an OOM is cleaned up."""
    plan = st.plan
    with D.catch_oom() as caught:
        batch = make_batches(plan.kind, plan.vocab_size, batch_size, plan.seq_len, 1, plan.seed, plan.dev)[0]
        timer = D.PhaseTimer(plan.dev)
        timer.mark()
        for _ in range(probe_steps):
            v.step(batch, timer)
        timer.intervals_ms()
        del batch
    if caught:
        if v.optimizer is not None:
            v.optimizer.zero_grad(set_to_none=True)  # a backward cut short leaves gradients behind
        D.cleanup_after_oom(plan.dev)
    st.progress(0, f"max batch {v.name}: {batch_size} {'no' if caught else 'fits'}")
    return not caught


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int) -> tuple[int, bool]:
    """The largest b in [1, cap] with fits(b), assuming fitting is monotone; (0, False) if none.

    Doubles up from ``start`` (or halves down) to bracket the limit, then bisects. The bool
    says the cap was reached, so the true limit may be higher.
    """
    lo, hi = 0, None
    b = min(start, cap)
    if fits(b):
        lo = b
        while lo < cap:
            nb = min(lo * 2, cap)
            if fits(nb):
                lo = nb
            else:
                hi = nb
                break
        if hi is None:
            return lo, True
    else:
        hi = b
        while b > 1:
            b //= 2
            if fits(b):
                lo = b
                break
            hi = b
        if lo == 0:
            return 0, False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def _find_max_batch(st: _State, builder: Builder) -> None:
    """Each variant alone on the device: its largest batch, then its throughput there."""
    plan = st.plan
    for v in st.variants.values():
        if v.module is not None:
            v.release()
    st.variants = {}
    D.release_memory(plan.dev)
    for name in VARIANTS:
        rec = st.records[name]
        with D.catch_oom() as caught:
            module = builder(name == "tied", plan.dev, plan.seed)
            if plan.mode == "infer":
                module.eval()
            v = Variant(name=name, module=module, fn=torch.compile(module) if plan.compile else module,
                        dev=plan.dev, dtype=plan.dtype, mode=plan.mode)
            if plan.mode == "train":
                v.optimizer, _ = D.make_adamw(module.parameters(), plan.dev, LR, WEIGHT_DECAY)
                v.scaler = D.grad_scaler(plan.dev, plan.dtype)
        if caught:
            rec.max_batch_status = f"out of memory building the model alone ({caught[0]})"
            D.cleanup_after_oom(plan.dev)
            continue
        best, capped = largest_fitting(lambda b: _fits(st, v, b), plan.batch_size, plan.max_batch_cap)
        rec.max_batch, rec.max_batch_capped = best, capped
        if best == 0:
            rec.max_batch_status = "not even a batch of 1 fits"
        else:
            _measure_alone(st, v, best, rec)
        v.release()
        module = None  # the last reference to the model: free it before the next variant is built
        D.release_memory(plan.dev)


def _measure_alone(st: _State, v: Variant, batch_size: int, rec: VariantRecord) -> None:
    plan = st.plan
    phase_count = len(PHASES[plan.mode])
    with D.catch_oom() as caught:
        batches = make_batches(plan.kind, plan.vocab_size, batch_size, plan.seq_len, 2, plan.seed, plan.dev)
        D.reset_peak_memory(plan.dev)
        rounds = []
        n_rounds = max(MIN_ROUNDS_FOR_VERDICT, plan.rounds // 2)  # big batches: fewer, longer steps suffice
        for r in range(n_rounds):
            timer = D.PhaseTimer(plan.dev)
            timer.mark()
            for s in range(plan.steps):
                v.step(batches[s % 2], timer)
                st.progress(0, f"max batch {v.name}: round {r + 1}/{n_rounds} at {batch_size}")
            ms = timer.intervals_ms()
            rounds.append([sum(ms[i:i + phase_count]) for i in range(0, len(ms), phase_count)])
        rec.max_batch_samples = rounds
        rec.max_batch_peak_bytes = D.max_memory_allocated(plan.dev)
    if caught:
        D.cleanup_after_oom(plan.dev)
        rec.max_batch_samples = None
        rec.max_batch_status = f"fits {batch_size} for a few steps but ran out of memory over the rounds ({caught[0]})"


# ------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------

def _config_repr(cfg: BenchConfig) -> str:
    def default(f):
        return f.default_factory() if f.default_factory is not MISSING else f.default

    changed = [f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg) if getattr(cfg, f.name) != default(f)]
    return f"run_bench(BenchConfig({', '.join(changed)}))"


def _result(st: _State, cfg: BenchConfig, command: Optional[str]) -> BenchResult:
    plan = st.plan
    tokens = plan.batch_size * plan.seq_len
    flops = step_flops(st.shape, plan.seq_len, plan.batch_size, plan.mode) if st.shape else None
    peak, peak_source = D.peak_tflops(plan.dev, plan.dtype, plan.peak_tflops)
    notes = list(st.notes)
    if plan.compile and plan.decodes:
        notes.append("decoding runs the uncompiled model (each decoding step has a new shape)")
    if plan.kind == "encoder-decoder":
        notes.append(f"tokens/s counts predicted (target) tokens; each step also reads a {plan.seq_len}-token source")
    if plan.find_max_batch:
        notes.append("max batch: each variant alone on the device, largest batch found by doubling then bisection "
                     "(3 steps per probe); throughput there measured one variant after the other (not interleaved)")
    precision = ("fp32" if plan.dtype == "fp32" else
                 f"{plan.dtype} autocast (weights, gradients and AdamW state in fp32)")
    model = plan.model + "".join(f", {k}={v}" for k, v in plan.overrides.items())
    header = {
        "title": f"tiecheck bench: {model}, {plan.mode}, batch {plan.batch_size} x {plan.seq_len} tokens, "
                 f"{plan.dtype}{', compiled' if plan.compile else ''}, {plan.dev.type}",
        "command": command or _config_repr(cfg),
        "device": D.device_description(plan.dev),
        "device_name": D.device_name(plan.dev),
        "host_load": st.host_load,
        "torch": torch.__version__,
        "tiecheck": __version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": model,
        "model_description": plan.description,
        "mode": plan.mode,
        "dtype": plan.dtype,
        "precision": precision,
        "compile": plan.compile,
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "tokens_per_step": tokens,
        "rounds": plan.rounds,
        "steps_per_round": plan.steps,
        "warmup_steps": plan.warmup,
        "seed": plan.seed,
        "optimizer": f"{st.optimizer_label}, lr {LR:g}, weight decay {WEIGHT_DECAY:g}" if plan.mode == "train" else None,
        "order": " ".join("A" if n == "tied" else "B" for n in st.order),
        "decode": (f"greedy, KV cache, prompt {plan.prompt_len} tokens, {plan.decode_tokens} new tokens x "
                   f"batch {plan.batch_size}, one call per variant per round") if plan.decodes else None,
        "flops_per_step": flops,
        "flops_convention": ("PaLM appendix B: forward 2*N*T + 4*L*T^2*d per sequence, N = matmul parameters "
                             f"({st.shape.n_matmul_params:,}), L = {st.shape.n_attention_layers} attention layers, "
                             f"d = {st.shape.d_attn}; full attention"
                             + ("; a train step is 3 x forward" if plan.mode == "train" else "")) if st.shape else None,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "max_batch_cap": plan.max_batch_cap if plan.find_max_batch else None,
    }
    return BenchResult(header=header, records=st.records, checks=st.checks, notes=notes, tokens_per_step=tokens,
                       flops_per_step=flops, peak_tflops=peak, decode_tokens_per_call=plan.batch_size * plan.decode_tokens
                       if plan.decodes else None, seq_len=plan.seq_len, mode=plan.mode)


def command_line(argv: list[str] | None = None) -> str:
    return shlex.join(["tiecheck", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["BenchConfig", "Plan", "run_bench", "resolve", "order_of_round", "largest_fitting", "command_line"]
