"""``tiecheck bench --find-max-batch``: the largest batch each variant trains, found by doubling then bisection.

Each probe builds the variant alone (the other released), runs ``PROBE_STEPS`` steps at the batch size
tried, and counts an out-of-memory error as not fitting; the search and each variant's throughput at its
own largest batch are what the run's result reports beside the interleaved rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from tiecheck.bench import device as D
from tiecheck.bench.protocol import (
    PHASES,
    Batch,
    Variant,
    make_batches,
    mark_batch_dynamic,
)
from tiecheck.bench.results import VariantRecord
from tiecheck.bench.run_state import RunState, build_variant
from tiecheck.bench.settings import (
    LEAK_TOLERANCE,
    VARIANTS,
    Builder,
)
from tiecheck.bench.stats import MIN_ROUNDS_FOR_VERDICT
from tiecheck.report.text import human_bytes

# ------------------------------------------------------------------------------------------
# --find-max-batch
# ------------------------------------------------------------------------------------------

PROBE_STEPS = 2  # the second step runs with the AdamW state allocated in the first: the steady peak


def probe_batches(st: RunState, batch_size: int, n: int) -> list[Batch]:
    """Batches for the max-batch search; compiled, their batch dimension is marked dynamic.

    Without the mark every probed size compiled a new graph (minutes each, for each variant),
    and the search overran its time limit.
    """
    plan = st.plan
    batches = make_batches(plan.kind, plan.vocab_size, batch_size, plan.seq_len, n, plan.seed, plan.dev)
    if plan.compile:
        for b in batches:
            mark_batch_dynamic(b)
    return batches


def fits(st: RunState, v: Variant, batch_size: int, probe_steps: int = PROBE_STEPS) -> bool:
    """Whether ``probe_steps`` steps at ``batch_size`` run; an OOM is cleaned up."""
    plan = st.plan
    with D.catch_oom() as caught:
        batch = probe_batches(st, batch_size, 1)[0]
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


def check_released(st: RunState, baseline: int | None, after: str) -> None:
    """Note memory a released variant left allocated: the next variant had that much less."""

    now = D.memory_allocated(st.plan.dev)
    if baseline is None or now is None or now - baseline <= LEAK_TOLERANCE:
        return
    st.notes.append(f"max batch: {human_bytes(now - baseline)} still allocated after releasing the {after} "
                    "variant (not back to the memory before the search); the next variant had that much less")


def find_max_batch(st: RunState, builder: Builder, emit: Callable[[str], None] = lambda what: None) -> None:
    """Each variant alone on the device: its largest batch, then its throughput there.

    ``emit(what)`` hands the result so far out before the search and after each variant.
    """
    plan = st.plan
    for v in st.variants.values():
        if v.module is not None:
            v.release()
    st.variants = {}
    st.batches = []  # the interleaved pool is done with
    D.release_memory(plan.dev, compiled=plan.compile)
    baseline = D.memory_allocated(plan.dev)
    emit("--find-max-batch had not started")
    for name in VARIANTS:
        rec = st.records[name]
        with D.catch_oom() as caught:
            v, _ = build_variant(plan, builder, name)
        if caught:
            rec.max_batch_status = f"out of memory building the model alone ({caught[0]})"
            v = None  # what was built before the failure must not stay resident for the next variant
            D.cleanup_after_oom(plan.dev)
            check_released(st, baseline, name)
            continue
        best, capped = largest_fitting(partial(fits, st, v), plan.batch_size, plan.max_batch_cap)
        rec.max_batch, rec.max_batch_capped = best, capped
        if best == 0:
            rec.max_batch_status = "not even a batch of 1 fits"
        else:
            measure_alone(st, v, best, rec)
        v.release()
        v = None  # the last reference to the model: free it before the next variant is built
        D.release_memory(plan.dev, compiled=plan.compile)
        check_released(st, baseline, name)
        if name != VARIANTS[-1]:
            emit(f"--find-max-batch had not finished the {VARIANTS[-1]} variant")


def measure_alone(st: RunState, v: Variant, batch_size: int, rec: VariantRecord) -> None:
    plan = st.plan
    phase_count = len(PHASES[plan.mode])
    with D.catch_oom() as caught:
        batches = probe_batches(st, batch_size, 2)
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
