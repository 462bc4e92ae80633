"""``tiecheck bench --mode converge``: does tying change what the model learns, not only how fast?

    from tiecheck.bench.converge import ConvergeConfig, run_converge

    result = run_converge(ConvergeConfig(quick=True))
    result.to_frame()     # one row per (variant, metric, step): value, ci_low, ci_high, n, verdict
    result.verdicts()     # ['validation loss: tied lower by 0.21 nats (...)', ...]

Protocol. For each of ``seeds`` seeds, the tied and the untied variant are built from the same
initial weights (the untied head a copy of the embedding) and trained on the same batches in the
same order, with the same AdamW and learning-rate schedule, for ``steps`` steps; a seed changes
the initial weights and the order of the batches, and both variants share it. Every
``eval_every`` steps both are scored on the same held-out validation sequences. A seed is one
independent replicate, so the statistics are over seeds: each variant's mean with a 95%
Student-t interval, and the paired difference tied - untied (per seed, then its mean and
interval). With three seeds a bootstrap percentile interval would have only ten distinct means
to draw from and cover far less than 95%; the t interval is exact for normal differences and
honest about having few of them. A difference is claimed only when its interval excludes 0.
The same correctness checks as ``train`` mode run on every seed: identical start, the tie
intact at the end, the untied copy diverged, every loss finite.

The data (:mod:`tiecheck.bench.corpus`) needs no network: the standard library's sources by
default, split by file; the tokenizer (:mod:`tiecheck.bench.tokenizer`) is a byte-level BPE
trained on the training split and cached.

Models. A bundled decoder preset (its vocabulary set to the tokenizer's), a Hugging Face folder
or config, or ``--model path/to/file.py:factory`` -- the one contract of every bench mode,
:mod:`tiecheck.bench.usermodel`: ``factory(tied: bool, vocab_size: int = ..., seed: int = ...)``
returns a ``torch.nn.Module`` whose ``forward(idx)`` returns the logits; ``vocab_size`` (the
tokenizer's) and ``seed`` are passed when the factory names them.

On a GPU the steps run under bf16 autocast (where the GPU has it; ``--dtype`` chooses) and the
host waits for the device only at the validation passes: each step's loss stays on the device
until then, so a step never stalls the queue. Both variants' training time (validation passes
excluded) and their training state are recorded, so the run ends with one verdict line that
joins throughput, memory and loss.
"""

from __future__ import annotations

import math
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tiecheck import __version__, models
from tiecheck.bench import device as D
from tiecheck.bench import stats, usermodel
from tiecheck.bench.converge_settings import ConvergeConfig, Plan, Progress, resolve
from tiecheck.bench.dataset import Data, prepare_data, seed_batches
from tiecheck.bench.flops import flops_shape, step_flops
from tiecheck.bench.protocol import (
    diverged,
    identical_weights,
    optimizer_state_bytes,
    param_count,
    still_tied,
    tie_groups,
    weight_bytes,
)
from tiecheck.bench.results import bytes_verdict
from tiecheck.bench.seeds import (
    MIN_SEEDS,
    Interval,
    difference_verdict,
    mean_interval,
    paired_intervals,
    ppl_verdict,
    separation_step,
)
from tiecheck.bench.usermodel import logits_of
from tiecheck.errors import TiecheckError

VARIANTS = ("tied", "untied")
DIFF = "tied-untied"  # the paired difference, tied minus untied, per seed
RATIO = "tied/untied"  # the perplexity ratio, exp of the difference
COLUMNS = ["variant", "metric", "step", "unit", "value", "ci_low", "ci_high", "n", "verdict"]
METRICS: dict[str, tuple[str, str]] = {
    "val_loss": ("validation loss", "nats"),
    "val_ppl": ("validation perplexity", "ppl"),
    "train_loss": ("training loss (mean since last eval)", "nats"),
    "params": ("parameters (counted once)", "count"),
    "separated_from_step": ("paired difference outside 0 from step", "step"),
}
CONFIDENCE = 0.95
WARMUP_FRACTION, FINAL_LR_FRACTION = 0.1, 0.1
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 0.1, 1.0

# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------

def make_builder(plan: Plan, vocab_size: int) -> Callable[[bool, int], nn.Module]:
    """(tied, seed) -> model on the plan's device, with the tokenizer's vocabulary."""
    if plan.user is not None:
        user = plan.user
        return lambda tied, seed: usermodel.build(user, tied, plan.dev, seed, vocab_size=vocab_size)
    overrides = {**plan.overrides, "vocab_size": vocab_size}
    return lambda tied, seed: models.build(plan.model, tied=tied, device=plan.dev, seed=seed, **overrides)


def lm_loss(model: nn.Module, window: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy of ``window`` (batch, seq + 1), in float32."""
    logits = logits_of(model(window[:, :-1]))
    if logits.shape[-1] != vocab_size:
        raise TiecheckError(f"the model scores {logits.shape[-1]} tokens but the tokenizer has {vocab_size}; "
                            f"use a tokenizer of the model's vocabulary (or --vocab-size {logits.shape[-1]} "
                            "to train one)")
    return F.cross_entropy(logits.float().reshape(-1, vocab_size), window[:, 1:].reshape(-1))


def lr_at(step: int, plan: Plan) -> float:
    """Linear warm-up over the first tenth, then cosine down to a tenth of the peak."""
    warm = max(1, int(plan.steps * WARMUP_FRACTION))
    if step < warm:
        return plan.lr * (step + 1) / warm
    t = (step - warm) / max(1, plan.steps - warm)
    return plan.lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, batch_size: int, vocab_size: int, dtype: str = "fp32") -> float:
    """Mean validation loss over every held-out sequence (equal lengths, so a mean of means).

    The losses are added on the device and read once: one host sync per validation pass.
    """
    was = model.training
    model.eval()
    total = torch.zeros((), device=val.device)
    with D.autocast(val.device, dtype):
        for i in range(0, val.shape[0], batch_size):
            chunk = val[i: i + batch_size]
            total += lm_loss(model, chunk, vocab_size) * chunk.shape[0]
    model.train(was)
    return float(total) / val.shape[0]


@dataclass
class Run:
    """One variant's curves for one seed, its training time and the state it trained with."""

    train_losses: list[float] = field(default_factory=list)  # every step
    val_losses: list[float] = field(default_factory=list)  # every evaluation step
    train_ms: float = 0.0  # the training steps' time, validation passes excluded
    state_bytes: int = 0  # weights + gradients + AdamW state, exact tensor bytes


def train(model: nn.Module, batches: torch.Tensor, val: torch.Tensor, plan: Plan, vocab_size: int, seed: int,
          progress: Progress, label: str) -> Run:
    """Train ``model`` on ``batches`` in order and score it at the evaluation steps.

    The global RNG is seeded (inside a fork, so the caller's is untouched) for anything the model
    draws while training -- dropout -- so both variants of a seed draw alike. Each step's loss
    stays on the device until the next validation pass, where the host waits anyway: on a GPU no
    step stalls the queue (a ``float(loss)`` per step was one host sync per step). The time of
    the training steps is read from marks between the validation passes (CUDA events on a GPU).
    """
    run = Run()
    dev = plan.dev
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    evals = set(plan.eval_steps())
    val = val.to(dev)
    timer = D.PhaseTimer(dev)
    losses: list[torch.Tensor] = []
    grads = 0
    with torch.random.fork_rng(devices=[dev] if D.is_cuda(dev) else []):
        torch.manual_seed(seed)
        model.train()
        for step in range(plan.steps):
            if step in evals:
                if step:
                    timer.mark()  # the training segment ends
                run.val_losses.append(evaluate(model, val, plan.batch_size * 2, vocab_size, plan.dtype))
                timer.mark()  # the next one starts
            for group in opt.param_groups:
                group["lr"] = lr_at(step, plan)
            with D.autocast(dev, plan.dtype):
                loss = lm_loss(model, batches[step].to(dev, non_blocking=True), vocab_size)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            if step == plan.steps - 1:
                grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            progress(1, label)
        timer.mark()
        run.val_losses.append(evaluate(model, val, plan.batch_size * 2, vocab_size, plan.dtype))
    run.train_ms = sum(timer.intervals_ms()[0::2])
    run.train_losses = torch.stack(losses).float().cpu().tolist()
    run.state_bytes = weight_bytes(model) + grads + optimizer_state_bytes(opt)
    return run


# ------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    variant: str
    metric: str
    step: int | None
    unit: str
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    verdict: str = ""

    @classmethod
    def of(cls, variant: str, metric: str, step: int | None, e: Interval, verdict: str = "") -> Row:
        return cls(variant, metric, step, METRICS[metric][1], e.mean, e.low, e.high, e.n, verdict)


@dataclass
class ConvergeResult:
    """Curves per variant and seed, the checks, and the statistics derived from them.

    ``curves[variant][metric]`` is [seed][eval step] for ``val_loss`` and ``train_loss`` (the
    mean training loss of the steps since the previous evaluation; at step 0, none: NaN).
    """

    header: dict[str, Any]
    steps: list[int]
    curves: dict[str, dict[str, list[list[float]]]]
    params: dict[str, int]
    checks: dict[str, bool]
    notes: list[str] = field(default_factory=list)
    mode: str = "converge"
    train_ms: dict[str, list[float]] = field(default_factory=dict)  # variant -> per seed, validation excluded
    tokens_per_run: int = 0  # tokens one variant trains on per seed
    state_bytes: dict[str, int] = field(default_factory=dict)  # variant -> weights + grads + AdamW state

    def throughput(self) -> Interval | None:
        """The training tokens/s ratio tied/untied: per seed (the variants of a seed ran back to back), then
        its geometric mean and 95% t interval over seeds."""
        t, u = self.train_ms.get("tied") or [], self.train_ms.get("untied") or []
        if len(t) < MIN_SEEDS or len(t) != len(u) or not all(t):
            return None
        # On the log scale, as ratios compose: the interval stays positive and symmetric in tied and untied.
        r = mean_interval([math.log(b / a) for a, b in zip(t, u, strict=True)])
        return Interval(math.exp(r.mean), math.exp(r.low), math.exp(r.high), r.n)

    def tokens_per_s(self, variant: str) -> float | None:
        ms = self.train_ms.get(variant) or []
        return self.tokens_per_run * len(ms) / (sum(ms) / 1e3) if ms and sum(ms) else None

    def verdict_line(self) -> str | None:
        """One line joining the three answers: throughput, memory and the validation loss."""
        parts = []
        r = self.throughput()
        if r is not None:
            parts.append(stats.verdict(stats.Estimate(r.mean, r.low, r.high, r.n), "training tokens/s",
                                       lower_is_better=False))
        t, u = self.state_bytes.get("tied"), self.state_bytes.get("untied")
        if t and u:
            parts.append(bytes_verdict(t, u, "weights+grads+AdamW state"))
        parts.append(self.headline() or "")
        return stats.join_verdicts(parts)

    def _arr(self, variant: str, metric: str) -> np.ndarray:
        return np.asarray(self.curves[variant][metric], dtype=float)

    def diff(self, metric: str = "val_loss") -> list[Interval]:
        """The paired difference tied - untied at every evaluation step."""
        return paired_intervals(self._arr("tied", metric), self._arr("untied", metric))

    def per_seed_diff(self, metric: str = "val_loss") -> list[float]:
        """tied - untied at the last evaluation step, one value per seed."""
        return list(self._arr("tied", metric)[:, -1] - self._arr("untied", metric)[:, -1])

    def separated_from(self) -> int | None:
        """The first step from which the validation loss difference stays outside 0 (None: not separated)."""
        return separation_step(self.steps, self.diff("val_loss"))

    def separation_line(self) -> str:
        s, last = self.separated_from(), self.steps[-1]
        if s is None:
            return (f"separation: the curves have not separated by step {last}: the paired validation loss "
                    "difference's interval contains 0 there")
        side = "below" if self.diff("val_loss")[-1].mean < 0 else "above"
        return (f"separation: the curves have separated: the paired validation loss difference stays {side} 0 "
                f"from step {s} to the last step ({last})")

    def rows(self) -> list[Row]:
        out: list[Row] = []
        last = self.steps[-1]
        for metric in ("val_loss", "train_loss"):
            per = {v: self._arr(v, metric) for v in VARIANTS}
            diffs = self.diff(metric)
            for j, step in enumerate(self.steps):
                if np.isnan(per["tied"][:, j]).any():
                    continue
                for v in VARIANTS:
                    e = mean_interval(per[v][:, j])
                    out.append(Row.of(v, metric, step, e))
                    if metric == "val_loss":
                        ppl = Interval(math.exp(e.mean), math.exp(e.low), math.exp(e.high), e.n)
                        out.append(Row.of(v, "val_ppl", step, ppl))
                d = diffs[j]
                final = step == last
                out.append(Row.of(DIFF, metric, step, d,
                                  difference_verdict(d, METRICS[metric][0]) if final and metric == "val_loss"
                                  else ""))
                if metric == "val_loss":
                    out.append(Row(RATIO, "val_ppl", step, "ratio", math.exp(d.mean), math.exp(d.low),
                                   math.exp(d.high), d.n, ppl_verdict(d) if final else ""))
        for v in VARIANTS:
            out.append(Row(v, "params", None, "count", self.params.get(v)))
        s = self.separated_from()
        out.append(Row(DIFF, "separated_from_step", None, "step", None if s is None else float(s),
                       verdict=self.separation_line()))
        return out

    def to_frame(self):
        """One row per (variant, metric, step); see COLUMNS."""
        import pandas as pd  # noqa: PLC0415 - pandas costs 0.3 s; only the frame needs it

        frame = pd.DataFrame([r.__dict__ for r in self.rows()], columns=COLUMNS)
        frame["n"] = frame["n"].astype("Int64")
        frame["step"] = frame["step"].astype("Int64")
        return frame

    def checks_passed(self) -> bool:
        return all(self.checks.values())

    def failures(self) -> list[str]:
        return []

    def measured(self) -> bool:
        return bool(self.steps)

    def verdicts(self) -> list[str]:
        return [r.verdict for r in self.rows() if r.verdict]

    def headline(self) -> str | None:
        v = self.verdicts()
        return v[0] if v else None

    def final(self, variant: str, metric: str) -> Row | None:
        for r in self.rows():
            if r.variant == variant and r.metric == metric and r.step == self.steps[-1]:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "header": dict(self.header),
            "checks": dict(self.checks),
            "headline": self.headline(),
            "verdicts": self.verdicts(),
            "verdict": self.verdict_line(),
            "train_ms": {v: list(ms) for v, ms in self.train_ms.items()},
            "training_tokens_per_s": {v: self.tokens_per_s(v) for v in self.train_ms},
            "state_bytes": dict(self.state_bytes),
            "separated_from_step": self.separated_from(),
            "notes": list(self.notes),
            "steps": list(self.steps),
            "results": [dict(r.__dict__) for r in self.rows()],
            "curves": {v: {m: [[None if math.isnan(x) else x for x in seed] for seed in arr]
                           for m, arr in ms.items()} for v, ms in self.curves.items()},
        }

    def to_json(self) -> str:
        import json  # noqa: PLC0415 - only the JSON output needs it

        return json.dumps(self.to_dict(), indent=2) + "\n"


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

def run_converge(cfg: ConvergeConfig = ConvergeConfig(), *, progress: Progress | None = None,
                 command: str | None = None, announce: Callable[[str], None] | None = None) -> ConvergeResult:
    """Train tied and untied variants over ``cfg.seeds`` seeds and compare their curves.

    Args:
        cfg: what to train (see ConvergeConfig; None fields take defaults).
        progress: called with (steps done, label) as training goes.
        command: the command line shown in the header.
        announce: called once with the run's budget (``Plan.budget``), when the data is ready and
            training is about to start.

    Returns:
        The ConvergeResult.
    """
    plan = resolve(cfg)
    threads = torch.get_num_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    try:
        return _run(plan, cfg, progress or (lambda n, label: None), command, announce)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(plan: Plan, cfg: ConvergeConfig, progress: Progress, command: str | None,
         announce: Callable[[str], None] | None = None) -> ConvergeResult:
    load = D.host_load()
    data = prepare_data(plan, cfg)
    vocab = data.tok.vocab_size
    build = make_builder(plan, vocab)
    curves = {v: {"val_loss": [], "train_loss": []} for v in VARIANTS}
    params: dict[str, int] = {}
    ok = {"start": True, "first": True, "tied": True, "diverged": True, "finite": True}
    tie_share = None
    steps = plan.eval_steps()
    train_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    state: dict[str, int] = {}
    for i in range(plan.seeds):
        seed = plan.seed + i
        tied, untied = build(True, seed), build(False, seed)
        groups = tie_groups(tied)
        if not groups:
            raise TiecheckError(f"--model {plan.model}: the tied build shares no Parameter between two names; "
                                "the factory must tie the embedding and the output layer when tied=True")
        rows = tied.get_parameter(groups[0][0]).shape[0]  # the tied matrix: one row per token
        if rows != vocab:
            raise TiecheckError(f"the model's vocabulary is {rows} tokens (its tied matrix has {rows} rows) but the "
                                f"tokenizer has {vocab}; use a tokenizer of the model's vocabulary (or "
                                f"--vocab-size {rows} to train one)")
        if i == 0 and announce is not None:  # the input is good: the run starts now
            announce(plan.budget(step_flops_of(plan, vocab)))
        ok["start"] &= bool(not tie_groups(untied) and identical_weights(tied, untied))
        params = {"tied": param_count(tied), "untied": param_count(untied)}
        tie_share = (params["untied"] - params["tied"]) / params["untied"]
        batches = seed_batches(data.train_ids, plan, seed)
        runs = {}
        # Tied first for even seeds, untied first for odd ones: a drift in the device's speed (clocks,
        # other tenants) reaches both variants alike, and the paired throughput cancels it.
        order = (("tied", tied), ("untied", untied)) if i % 2 == 0 else (("untied", untied), ("tied", tied))
        for name, model in order:
            runs[name] = train(model, batches, data.val, plan, vocab, seed, progress, f"seed {seed} {name}")
            train_ms[name].append(runs[name].train_ms)
            state[name] = runs[name].state_bytes
        ok["first"] &= math.isclose(runs["tied"].train_losses[0], runs["untied"].train_losses[0],
                                    rel_tol=_first_loss_tolerance(plan))
        ok["tied"] &= still_tied(tied, groups)
        ok["diverged"] &= diverged(untied, groups)
        for name, run in runs.items():
            ok["finite"] &= all(math.isfinite(x) for x in run.train_losses + run.val_losses)
            curves[name]["val_loss"].append(run.val_losses)
            curves[name]["train_loss"].append(_window_means(run.train_losses, steps))
        del tied, untied
    n = plan.seeds
    checks = {
        f"identical start (same values by name; tied shares, untied copies), {n} seeds": ok["start"],
        f"same first loss (within {_first_loss_tolerance(plan):g} relative), {n} seeds": ok["first"],
        f"tied variant still tied after training, {n} seeds": ok["tied"],
        f"untied variant diverged (separate memory, different values), {n} seeds": ok["diverged"],
        "every training and validation loss finite": ok["finite"],
    }
    header = _header(plan, data, command, load, params, tie_share)
    notes = []
    seen = plan.steps * plan.batch_size * plan.seq_len
    if seen > data.train_ids.numel():
        notes.append(f"each seed trains on {seen:,} tokens, more than the {data.train_ids.numel():,} of the training "
                     "split: windows repeat, so the curves include memorisation")
    if plan.quick:
        notes.append("--quick: a smoke test on a smaller model and a short run; its verdict says little about "
                     "the default experiment")
    return ConvergeResult(header=header, steps=steps, curves=curves, params=params, checks=checks, notes=notes,
                          train_ms=train_ms, tokens_per_run=plan.steps * plan.batch_size * plan.seq_len,
                          state_bytes=state)


def _first_loss_tolerance(plan: Plan) -> float:
    # In 16-bit autocast the two graphs' sums may round apart in the third digit; in fp32 they agree to 1e-4.
    return 1e-4 if plan.dtype == "fp32" else 1e-2


def step_flops_of(plan: Plan, vocab_size: int) -> int | None:
    """The analytic FLOPs of one training step of the plan's model (its shape read on the meta device), or None."""
    if plan.user is not None and not plan.user.hf:
        return None  # a factory's model says nothing of its layers
    try:
        if plan.user is not None:
            model = usermodel.build(plan.user, True, torch.device("meta"), plan.seed, vocab_size=vocab_size)
        else:
            model = models.build(plan.model, tied=True, device="meta", **{**plan.overrides, "vocab_size": vocab_size})
    except Exception:  # noqa: BLE001 - the budget line goes without FLOPs rather than stop the run
        return None
    shape = flops_shape(model)
    return step_flops(shape, plan.seq_len, plan.batch_size, "train") if shape else None


def _window_means(losses: list[float], steps: list[int]) -> list[float]:
    """The mean training loss of the steps since the previous evaluation step (NaN at step 0)."""
    out, prev = [], 0
    for s in steps:
        out.append(float(np.mean(losses[prev:s])) if s > prev else float("nan"))
        prev = s
    return out




def _header(plan: Plan, data: Data, command: str | None, load: str | None, params: dict[str, int],
            tie_share: float | None) -> dict[str, Any]:
    c = data.corpus
    threads = plan.threads or torch.get_num_threads()
    dev = f"cpu ({threads} thread{'s' if threads != 1 else ''})" if not D.is_cuda(plan.dev) else \
        torch.cuda.get_device_name(plan.dev)
    return {
        "title": (f"tiecheck bench --mode converge: {plan.model}, {plan.seeds} seeds x {plan.steps} steps, "
                  f"batch {plan.batch_size} x {plan.seq_len} tokens, {plan.dev.type}"),
        "command": command or "run_converge(...)",
        "device": dev,
        "host_load": load,
        "torch": torch.__version__,
        "tiecheck": __version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": plan.model,
        "model_description": plan.description,
        "vocab_size": data.tok.vocab_size,
        "params_tied": params.get("tied"),
        "params_untied": params.get("untied"),
        "tie_share": tie_share,
        "corpus": c.description,
        "train_split": f"{len(c.train)} files, {c.chars('train'):,} characters, {data.train_ids.numel():,} tokens",
        "val_split": (f"{len(c.val)} files, {c.chars('val'):,} characters; {data.val.shape[0]} sequences of "
                      f"{plan.seq_len} tokens scored"),
        "tokenizer": data.tok.source,
        "optimizer": (f"AdamW lr {plan.lr:g} (linear warm-up over {WARMUP_FRACTION:.0%} of the steps, cosine to "
                      f"{FINAL_LR_FRACTION:.0%}), betas {BETAS}, weight decay {WEIGHT_DECAY}, "
                      f"gradient clip {GRAD_CLIP}; "
                      + ("fp32" if plan.dtype == "fp32" else
                         f"{plan.dtype} autocast (weights, gradients and AdamW state in fp32)")),
        "dtype": plan.dtype,
        "steps": plan.steps,
        "seeds": plan.seeds,
        "first_seed": plan.seed,
        "eval_every": plan.eval_every,
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "platform": sys.platform,
    }
