"""The bench protocol: build both variants, warm up, run interleaved rounds, check, collect.

Schedule. Round r runs ``steps`` steps of each variant back to back, tied first in even
rounds and untied first in odd ones: A B | B A | A B | B A ... A slow drift (clock, thermals,
another process) then hits both variants equally often in first and second position, and the
paired bootstrap over rounds cancels it in their ratio.

Memory. Both variants stay resident during the rounds (interleaving needs them). Peak memory
is read in the rounds, after both variants have warmed up: before a variant's steps the peak
counter is reset and the allocated bytes noted, and its peak is what the steps allocated above
that, plus its own weights and optimizer state. Measuring in the warm-up instead charged the
variant that warmed up first with the process's one-time allocations (cuBLAS workspaces, about
32 MiB per handle and stream on Hopper; compiler autotuning buffers): always the tied one. In
the rounds each variant goes first half the time, and the smallest peak over the rounds is
kept -- a repeated step allocates the same, so anything more was allocated once.
"""

from __future__ import annotations

import copy
import platform
import re
from datetime import datetime, timezone

import torch

from tiecheck import __version__
from tiecheck.bench import device as D
from tiecheck.bench.flops import flops_shape, step_flops
from tiecheck.bench.max_batch import PROBE_STEPS, find_max_batch
from tiecheck.bench.protocol import (
    PHASES,
    Batch,
    Variant,
    diverged,
    identical_weights,
    make_batches,
    mark_batch_dynamic,
    optimizer_state_bytes,
    param_count,
    still_tied,
    tie_groups,
    weight_bytes,
)
from tiecheck.bench.results import BenchResult, VariantRecord
from tiecheck.bench.run_state import RunState, build_variant
from tiecheck.bench.settings import (
    LEAK_TOLERANCE,
    LR,
    N_BATCHES,
    VARIANTS,
    WEIGHT_DECAY,
    BenchConfig,
    Builder,
    Partial,
    Plan,
    Progress,
    bundled_builder,
    command_line,
    config_repr,
    order_of_round,
    resolve,
)
from tiecheck.errors import TiecheckError
from tiecheck.report.text import human_bytes

# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

_FLAG = re.compile(r"^--([a-z][a-z-]*) (\S+):")


def run_bench(cfg: BenchConfig = BenchConfig(), *, progress: Progress | None = None,
              build: Builder | None = None, command: str | None = None,
              partial: Partial | None = None) -> BenchResult:
    """Measure the tied and untied variants of ``cfg.model`` and return the result.

    ``build(tied, device, seed)`` replaces the bundled model builder: it must return the
    preset's model (with ``cfg.overrides``) or one with the same config and forward contract;
    ``command`` is shown in the header. ``partial(result)`` is called with the result so far
    before each long phase that follows the interleaved rounds (--find-max-batch, one call
    before and one after each variant), so a run cut short by a time limit still leaves them.
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
        with D.on_device(plan.dev):
            return _run(plan, cfg, progress, build, command, partial)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(plan: Plan, cfg: BenchConfig, progress: Progress | None, build: Builder | None,
         command: str | None, partial: Partial | None = None) -> BenchResult:
    st = RunState(plan=plan, host_load=D.host_load(), tf32=D.tf32_enabled(plan.dev))
    if progress is not None:
        st.progress = progress
    builder = build or plan.builder()

    if D.is_cuda(plan.dev):
        st.progress(0, "timing a matmul")
        st.matmul_tflops = _measure_matmul(plan)
    _build_variants(st, builder)
    _make_pool(st)
    for name in VARIANTS:
        _warm_up(st, name)
    _same_first_loss(st)
    _rounds(st)
    _peak_memory(st)
    _checks(st)
    if plan.find_max_batch:
        def emit(what: str) -> None:
            if partial is not None:
                partial(_result(st, cfg, command, pending=what))

        find_max_batch(st, builder, emit)
    for v in st.variants.values():
        if v.module is not None:
            v.release()
    del st.variants
    # Free the models' memory now, not when the caller lets go of the result.
    D.release_memory(plan.dev, compiled=plan.compile)
    return _result(st, cfg, command)


def _measure_matmul(plan: Plan) -> float | None:
    """A large matmul's TFLOP/s at the run's dtype, beside the datasheet peak MFU divides by."""
    with D.catch_oom() as caught:
        value = D.matmul_tflops(plan.dev, plan.dtype)
    D.release_memory(plan.dev)
    return None if caught else value


def _build_variants(st: RunState, builder: Builder) -> None:
    plan = st.plan
    for name in VARIANTS:
        rec = st.records[name] = VariantRecord(name=name)
        with D.catch_oom() as caught:
            v, label = build_variant(plan, builder, name)
            module = v.module
            st.optimizer_label = label or st.optimizer_label
            st.variants[name] = v
            rec.params = param_count(module)
            rec.weight_bytes = weight_bytes(module)
        if caught:
            st.variants.pop(name, None)
            _fail(st, name, f"out of memory building the model ({caught[0]})")
    tied, untied = st.variants.get("tied"), st.variants.get("untied")
    for v in (tied, untied):
        if v is not None and st.model_vocab is None:
            st.model_vocab = getattr(getattr(v.module, "config", None), "vocab_size", None)
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


def _fail(st: RunState, name: str, why: str) -> None:
    rec = st.records[name]
    rec.status = why
    rec.samples = {}
    rec.decode_samples = None
    v = st.variants.get(name)
    if v is not None:
        v.status = why
        v.release()
    D.cleanup_after_oom(st.plan.dev)


def _make_pool(st: RunState) -> None:
    plan = st.plan
    with D.catch_oom() as caught:
        st.batches = make_batches(plan.kind, plan.vocab_size, plan.batch_size, plan.seq_len, N_BATCHES, plan.seed,
                                  plan.dev)
        if plan.compile and plan.find_max_batch:
            # The search compiles each variant again with a dynamic batch; compiling the same
            # graphs here lets those compilations hit the compiler's on-disk caches.
            for b in st.batches:
                mark_batch_dynamic(b)
    if caught:
        for name in list(st.variants):
            _fail(st, name, f"out of memory: the batch of {plan.batch_size} x {plan.seq_len} tokens itself does "
                            f"not fit ({caught[0]}); use a smaller --batch-size")


def _batch(st: RunState, v: Variant) -> Batch:
    # Indexed by the variant's own step count, so both see the same batches in the same order.
    return st.batches[v.steps_done % len(st.batches)]


def _warm_up(st: RunState, name: str) -> None:
    v = st.variants.get(name)
    if v is None or not v.ok:
        return
    plan, rec = st.plan, st.records[name]
    with D.catch_oom() as caught:
        timer = D.PhaseTimer(plan.dev)
        timer.mark()
        for i in range(plan.warmup):
            st.progress(0, f"warm-up {name}")
            v.step(_batch(st, v), timer, capture_grads=i == plan.warmup - 1)
            st.progress(1, f"warm-up {name}")
        timer.intervals_ms()  # waits for the device; warm-up times are not kept
    if caught:
        _fail(st, name, f"out of memory at batch {plan.batch_size} x {plan.seq_len} in warm-up ({caught[0]}); "
                        "try a smaller --batch-size, or --find-max-batch")
        return
    rec.grad_bytes = v.grad_bytes
    if v.optimizer is not None:
        rec.optimizer_bytes = optimizer_state_bytes(v.optimizer)
    if v.losses:
        rec.loss_first = float(v.losses[0])


def _same_first_loss(st: RunState) -> None:
    # Same weights, same batch: the first forward must agree, or the variants did not start
    # alike. Not bit for bit: torch.compile fuses the two graphs differently, and in 16-bit
    # precision a reordered sum moves the loss in its third or fourth digit.
    a, b = st.records["tied"].loss_first, st.records["untied"].loss_first
    if a is not None and b is not None:
        rtol = 1e-4 if st.plan.dtype == "fp32" else 1e-2
        st.checks[f"same first loss (within {rtol:g} relative)"] = abs(a - b) <= rtol * max(1.0, abs(b))


def _rounds(st: RunState) -> None:
    plan = st.plan
    phases = PHASES[plan.mode]
    for rec in st.records.values():
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
                # Outside the timed steps: the reset synchronises, the timer's marks come after.
                D.reset_peak_memory(plan.dev)
                resident = D.memory_allocated(plan.dev)
                timer = D.PhaseTimer(plan.dev)
                timer.mark()
                for _ in range(plan.steps):
                    v.step(_batch(st, v), timer)
                    st.progress(1, label)
                ms = timer.intervals_ms()
                peak = D.max_memory_allocated(plan.dev) if resident is not None else None
                if peak is not None:
                    st.step_peaks.setdefault(name, []).append(peak - resident)
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


def _peak_memory(st: RunState) -> None:
    """Each variant's peak: the smallest of its rounds' step peaks, plus what it holds resident."""

    for name, above in st.step_peaks.items():
        rec = st.records[name]
        if not rec.ok or not above or rec.weight_bytes is None:
            continue
        rec.peak_bytes = min(above) + rec.weight_bytes + (rec.optimizer_bytes or 0)
        spread = max(above) - min(above)
        if spread > LEAK_TOLERANCE:
            st.notes.append(f"{name}: a round's steps allocated up to {human_bytes(spread)} more than its "
                            "smallest round; the peak shown is the smallest (one-time allocations excluded)")


def _checks(st: RunState) -> None:
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
# Result
# ------------------------------------------------------------------------------------------

def _result(st: RunState, cfg: BenchConfig, command: str | None, pending: str | None = None) -> BenchResult:
    """The result from what was measured; ``pending`` marks a partial result (what had not run)."""
    plan = st.plan
    tokens = plan.batch_size * plan.seq_len
    flops = step_flops(st.shape, plan.seq_len, plan.batch_size, plan.mode) if st.shape else None
    peak, peak_source = D.peak_tflops(plan.dev, plan.dtype, plan.peak_tflops, tf32=st.tf32)
    notes = [f"partial result, written before the run ended: {pending}"] if pending else []
    notes += st.notes
    vocab_note = _vocab_note(st)
    if vocab_note:
        notes.append(vocab_note)
    if plan.compile and plan.decodes:
        notes.append("decoding runs the uncompiled model (each decoding step has a new shape)")
    if plan.user is not None and plan.mode == "infer":
        notes.append("decoding is timed on the bundled models only (their own generate); for this model the "
                     "forward is")
    if plan.kind == "encoder-decoder":
        notes.append(f"tokens/s counts predicted (target) tokens; each step also reads a {plan.seq_len}-token source")
    if plan.find_max_batch:
        notes.append("max batch: each variant alone on the device, largest batch found by doubling then bisection "
                     f"({PROBE_STEPS} steps per probe); throughput there measured one variant after the other (not "
                     "interleaved)" + ("; compiled with a dynamic batch dimension, in the interleaved rounds too"
                                  if plan.compile else ""))
    if st.step_peaks:
        notes.append("peak device memory: the most a variant's steps allocated above what was resident before them, "
                     "smallest over the rounds (after both variants warmed up; each first in half the rounds), "
                     "plus its weights and optimizer state")
    precision = ("fp32" if plan.dtype == "fp32" else
                 f"{plan.dtype} autocast (weights, gradients and AdamW state in fp32)")
    model = plan.model + "".join(f", {k}={v}" for k, v in plan.overrides.items())
    if st.model_vocab and st.model_vocab > plan.vocab_size:
        model += f", vocab {plan.vocab_size:,} padded to {st.model_vocab:,}"
    header = {
        "title": f"tiecheck bench: {model}, {plan.mode}, batch {plan.batch_size} x {plan.seq_len} tokens, "
                 f"{plan.dtype}{', compiled' if plan.compile else ''}, {plan.dev.type}",
        "command": command or config_repr(cfg),
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
        "matmul_tflops": st.matmul_tflops,
        "matmul_dtype": plan.dtype if st.matmul_tflops is not None else None,
        "vocab_size": plan.vocab_size,
        "model_vocab_size": st.model_vocab,
        "max_batch_cap": plan.max_batch_cap if plan.find_max_batch else None,
    }
    records, checks = st.records, st.checks
    if pending:  # a snapshot: the run goes on changing its own records
        records, checks = copy.deepcopy(records), dict(checks)
    return BenchResult(header=header, records=records, checks=checks, notes=notes, tokens_per_step=tokens,
                       flops_per_step=flops, peak_tflops=peak, decode_tokens_per_call=plan.batch_size * plan.decode_tokens
                       if plan.decodes else None, seq_len=plan.seq_len, mode=plan.mode)


def _vocab_note(st: RunState) -> str | None:
    plan = st.plan
    if not st.model_vocab or st.model_vocab <= plan.vocab_size:
        return None
    return (f"vocabulary padded from {plan.vocab_size:,} to {st.model_vocab:,} rows (a multiple of the GPU's "
            "aligned matmul tiles; --pad-vocab 1 turns it off): input and label tokens are drawn below "
            f"{plan.vocab_size:,} and decoding never picks a padding row; the FLOPs count the padded head, which "
            "the device computes")


__all__ = [
    "BenchConfig",
    "Plan",
    "bundled_builder",
    "command_line",
    "order_of_round",
    "resolve",
    "run_bench",
]
