"""``tiecheck bench --nproc-per-node N``: tied vs untied under DDP or FSDP2, on every rank in lockstep.

The command launches itself through ``torch.distributed.run`` (torchrun's own module, so
``--nnodes`` and ``--rdzv-endpoint`` mean what they mean there); each worker runs
:func:`worker`: both variants built from the same seed on every rank, wrapped by the strategy,
stepped in the bench's interleaved rounds (A B | B A ...) on rank-specific batches.

What crosses the network is counted from the collectives issued, not from a formula:

- DDP: a communication hook (``DistributedDataParallel.register_comm_hook``) adds up the bytes
  of every gradient bucket it all-reduces, then all-reduces it as the default hook does;
- FSDP2: every unit's all-gather and reduce-scatter go through counting subclasses of torch's
  own defaults, installed with ``FSDPModule.set_custom_all_gather`` / ``set_custom_reduce_scatter``;
  the figure is the size of the gathered (unsharded) buffer and of the reduce-scatter input.

The fsdp2 strategy wraps with the plan of :mod:`tiecheck.plan.wrap` (every block its own unit,
the root last), fixed by the planner when a tie would straddle units -- so a tied model is
wrapped correctly by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from tiecheck import __version__
from tiecheck.bench import device as D
from tiecheck.bench import stats
from tiecheck.bench.protocol import Batch, Variant, make_batches
from tiecheck.bench.results import bytes_verdict
from tiecheck.bench.settings import LR, VARIANTS, WEIGHT_DECAY, BenchConfig, Plan, order_of_round, resolve
from tiecheck.errors import TiecheckError
from tiecheck.plan.wrap import apply_plan, check_plan
from tiecheck.report.text import human_bytes

STRATEGIES = ("ddp", "fsdp2")
COLLECTIVES = {"ddp": ("all_reduce",), "fsdp2": ("all_gather", "reduce_scatter")}


# ------------------------------------------------------------------------------------------
# Counting the collectives
# ------------------------------------------------------------------------------------------

@dataclass
class CommCounter:
    """Bytes per collective kind, as issued; ``step()`` closes one training step."""

    totals: dict[str, int] = field(default_factory=dict)
    steps: list[dict[str, int]] = field(default_factory=list)
    counting: bool = False

    def add(self, kind: str, nbytes: int) -> None:
        if self.counting:
            self.totals[kind] = self.totals.get(kind, 0) + nbytes

    def step(self) -> None:
        if self.counting:
            self.steps.append(dict(self.totals))
            self.totals = {}


def _ddp_hook(counter, bucket):  # unannotated: DDP refuses a hook whose annotations are strings
    buf = bucket.buffer()
    counter.add("all_reduce", buf.numel() * buf.element_size())
    return default_hooks.allreduce_hook(None, bucket)


class CountingAllGather(DefaultAllGather):
    """torch's default FSDP2 all-gather, counting the gathered buffer's bytes."""

    def __init__(self, counter: CommCounter) -> None:
        self.counter = counter

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.counter.add("all_gather", output_tensor.numel() * output_tensor.element_size())
        return super().__call__(output_tensor, input_tensor, group, async_op)


class CountingReduceScatter(DefaultReduceScatter):
    """torch's default FSDP2 reduce-scatter, counting its input's bytes (the unsharded gradients)."""

    def __init__(self, counter: CommCounter) -> None:
        self.counter = counter

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.counter.add("reduce_scatter", input_tensor.numel() * input_tensor.element_size())
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


# ------------------------------------------------------------------------------------------
# Wrapping
# ------------------------------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _grad_bytes(v: Variant, batch: Batch) -> int:
    """This rank's gradient bytes, read after one backward (every rank runs it: its collectives too).

    The optimizer does not step, and the gradients are dropped: the weights stay as they were.
    """
    with D.autocast(v.dev, v.dtype):
        loss = v.fn(*batch.inputs, targets=batch.targets).loss
    loss.backward()
    total = sum(_local(p.grad).nbytes for p in v.module.parameters() if p.grad is not None)
    v.optimizer.zero_grad(set_to_none=True)
    return total


def _state_bytes(module: nn.Module, opt: torch.optim.Optimizer, grads: int) -> dict[str, int]:
    """This rank's own bytes: weights, gradients and AdamW state (local shards under FSDP2)."""
    params = list(module.parameters())
    weights = sum(_local(p).nbytes for p in params)
    state = sum(_local(v).nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"weights": weights, "grads": grads, "optimizer": state, "total": weights + grads + state}


def mixed_precision(dtype: str) -> MixedPrecisionPolicy | None:
    """FSDP2's policy for a 16-bit run: parameters gathered and computed in ``dtype``, gradients reduced in
    fp32 -- what a bf16 FSDP2 training run uses. None for fp32 (FSDP2's default: everything fp32)."""
    if dtype == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=D.DTYPES[dtype], reduce_dtype=torch.float32)


def precision_line(strategy: str, dtype: str) -> str:
    """What the table was measured with, in the header's words."""
    if dtype == "fp32":
        return "fp32 weights, gradients and communication"
    if strategy == "fsdp2":
        return (f"FSDP2 MixedPrecisionPolicy(param_dtype={dtype}, reduce_dtype=fp32): parameters all-gathered and "
                f"computed in {dtype}, gradients reduce-scattered in fp32, fp32 shards and AdamW state; "
                f"{dtype} autocast over it")
    return f"{dtype} autocast over fp32 weights: DDP all-reduces fp32 gradients"


def _wrap(module: nn.Module, strategy: str, dev: torch.device, counter: CommCounter,
          dtype: str = "fp32") -> tuple[nn.Module, list[str]]:
    """The module as the strategy trains it, with the counters installed; and the calls made."""
    if strategy == "ddp":
        ddp = DistributedDataParallel(module, device_ids=[dev.index] if D.is_cuda(dev) else None)
        ddp.register_comm_hook(counter, _ddp_hook)
        return ddp, ["DistributedDataParallel(model)"]
    check = check_plan(module, "blocks")
    units = check.fix if check.fix is not None else check.units
    policy = mixed_precision(dtype)
    apply_plan(module, units, fully_shard, **({"mp_policy": policy} if policy is not None else {}))
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_all_gather(CountingAllGather(counter))
            m.set_custom_reduce_scatter(CountingReduceScatter(counter))
    return module, [u.call() for u in units]  # each with the mp_policy the header's precision line names


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------

def _groups(module: nn.Module) -> list[tuple[str, ...]]:
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return sorted(tuple(v) for v in by_id.values() if len(v) > 1)


def _tied(module: nn.Module, groups: list[tuple[str, ...]]) -> bool:
    """Every group still one Parameter (DTensor under FSDP2) on this rank."""
    return bool(groups) and all(all(module.get_parameter(n) is module.get_parameter(g[0]) for n in g) for g in groups)


def _diverged(module: nn.Module, groups: list[tuple[str, ...]]) -> bool:
    """The untied copies are separate and, after training, hold different values on this rank."""
    for g in groups:
        ts = [_local(module.get_parameter(n)).detach() for n in g]
        if any(t.untyped_storage().data_ptr() == ts[0].untyped_storage().data_ptr() or torch.equal(t, ts[0])
               for t in ts[1:]):
            return False
    return bool(groups)


# ------------------------------------------------------------------------------------------
# Progress: rank 0 says how far it is, the launcher shows it as it comes
# ------------------------------------------------------------------------------------------

PROGRESS = "tiecheck-progress:"  # the worker's progress lines on stdout: "<prefix> <done>/<total> <label>"


def _progress(rank: int, total: int) -> Callable[[int, str], None]:
    """Rank 0's progress, one line per change on stdout (flushed: a killed run has shown how far it got)."""
    done = 0

    def emit(n: int, label: str) -> None:
        nonlocal done
        done += n
        if rank == 0:
            print(f"{PROGRESS} {done}/{total} {label}", flush=True)

    return emit


# ------------------------------------------------------------------------------------------
# The worker (one per rank)
# ------------------------------------------------------------------------------------------

def worker(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Run the interleaved A/B protocol on this rank; every rank returns the gathered result."""
    strategy = cfg["strategy"]
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = (cfg.get("device") or "auto").lower()
    if wanted not in ("auto", "cpu", "cuda"):
        raise TiecheckError(f"--device {wanted}: with --nproc-per-node use cpu, cuda or auto (each rank takes the "
                            "GPU of its LOCAL_RANK)")
    use_cuda = wanted != "cpu" and torch.cuda.is_available()
    if wanted == "cuda" and not use_cuda:
        raise TiecheckError("--device cuda: CUDA is not available here; use --device cpu")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise TiecheckError(f"local rank {local_rank}: this node has {torch.cuda.device_count()} GPU(s) visible; "
                            "give --nproc-per-node at most that")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, device_id=dev if use_cuda else None)
    try:
        return _work(cfg, strategy, dev, backend)
    finally:
        dist.destroy_process_group()


def _work(cfg: dict[str, Any], strategy: str, dev: torch.device, backend: str) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = resolve_run(cfg, dev)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    progress = _progress(rank, 2 * (plan.warmup + plan.rounds * plan.steps))
    progress(0, "building both variants")
    # Same seed for the weights on every rank; rank-specific batches (data parallelism).
    batches = make_batches(plan.kind, plan.vocab_size, plan.batch_size, plan.seq_len, 4, plan.seed + 1 + rank, dev)
    probe = make_batches(plan.kind, plan.vocab_size, plan.batch_size, plan.seq_len, 1, plan.seed, dev)[0]
    build = plan.builder()
    variants: dict[str, Variant] = {}
    counters: dict[str, CommCounter] = {}
    calls: dict[str, list[str]] = {}
    groups: list[tuple[str, ...]] = []
    params: dict[str, int] = {}
    tied_shape: list[int] | None = None
    for name in VARIANTS:
        module = build(name == "tied", dev, plan.seed)
        if name == "tied":
            groups = _groups(module)
            if groups:
                tied_shape = list(module.get_parameter(groups[0][0]).shape)
        params[name] = sum(p.numel() for p in module.parameters())
        counters[name] = CommCounter()
        wrapped, calls[name] = _wrap(module, strategy, dev, counters[name], plan.dtype)
        if strategy == "ddp":
            opt, _ = D.make_adamw(wrapped.parameters(), dev, LR, WEIGHT_DECAY)
        else:  # DTensor parameters: the for-each kernels where the device has them
            opt = torch.optim.AdamW(wrapped.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=D.is_cuda(dev))
        variants[name] = Variant(name=name, module=module, fn=plan.call(wrapped), dev=dev, dtype=plan.dtype,
                                 mode="train", optimizer=opt, scaler=D.grad_scaler(dev, plan.dtype))
    k = 0
    for name in VARIANTS:
        timer = D.PhaseTimer(dev)
        for _ in range(plan.warmup):
            timer.mark()
            variants[name].step(batches[k % len(batches)], timer)
            timer.intervals_ms()
            k += 1
            progress(1, f"warm-up {name}")
    state = {n: _state_bytes(v.module, v.optimizer, _grad_bytes(v, batches[0])) for n, v in variants.items()}
    rounds: dict[str, list[float]] = {n: [] for n in VARIANTS}
    above: dict[str, list[int]] = {n: [] for n in VARIANTS}
    for r in range(plan.rounds):
        for name in order_of_round(r):
            v, counter = variants[name], counters[name]
            dist.barrier()  # every rank starts the variant's steps together
            # As the single-device runner: the peak is what the steps allocate above what is resident
            # (both variants are, and the other's weights and AdamW state are not this variant's).
            D.reset_peak_memory(dev)
            resident = D.memory_allocated(dev)
            counter.counting = True
            timer = D.PhaseTimer(dev)
            timer.mark()
            for s in range(plan.steps):
                v.step(batches[(r * plan.steps + s) % len(batches)], timer)
                counter.step()
                progress(1, f"round {r + 1}/{plan.rounds} {name}")
            ms = timer.intervals_ms()
            counter.counting = False
            rounds[name].append(sum(ms))
            peak = D.max_memory_allocated(dev) if resident is not None else None
            if peak is not None:
                above[name].append(peak - resident)
    mine = {
        "rank": rank,
        "node": int(os.environ.get("GROUP_RANK", "0")),
        "host": socket.gethostname(),
        "output": cfg.get("output"),
        "round_ms": rounds,
        "comm_steps": {n: counters[n].steps for n in VARIANTS},
        "state_bytes": state,
        # The smallest over the rounds (a repeated step allocates the same; more was allocated once),
        # plus the variant's own weights and AdamW state: its peak alone.
        "peak_bytes": {n: min(above[n]) + state[n]["weights"] + state[n]["optimizer"] if above[n] else None
                       for n in VARIANTS},
        "tied_intact": _tied(variants["tied"].module, groups),
        "untied_diverged": _diverged(variants["untied"].module, groups),
        "losses_finite": {n: bool(v.losses_finite()) for n, v in variants.items()},
        "probe_loss": {n: _probe_loss(v, probe) for n, v in variants.items()},
        "steps_done": {n: v.steps_done for n, v in variants.items()},
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return _assemble(cfg, plan, strategy, backend, world, dev, groups, params, calls, gathered, tied_shape)


def resolve_run(cfg: dict[str, Any], dev: torch.device) -> Plan:
    """The bench's own plan for this rank's device; the multi-process bench runs decoders."""
    plan = resolve(BenchConfig(model=cfg.get("model"), device=str(dev), dtype=cfg.get("dtype"),
                               batch_size=cfg.get("batch_size"), seq_len=cfg.get("seq_len"), rounds=cfg.get("rounds"),
                               steps=cfg.get("steps"), warmup=cfg.get("warmup"), seed=cfg.get("seed", 0),
                               threads=cfg.get("threads"), overrides=cfg.get("overrides") or {},
                               pad_vocab=cfg.get("pad_vocab")))
    if plan.kind != "decoder":
        raise TiecheckError(f"--model {plan.model}: the multi-process bench runs decoders (the gpt and llama presets, "
                            "a Hugging Face causal LM, or a factory)")
    return plan


def _probe_loss(v: Variant, batch: Batch) -> float:
    """The loss on one batch every rank holds: equal on every rank when the replicas agree."""
    with torch.no_grad(), D.autocast(v.dev, v.dtype):
        return float(v.fn(*batch.inputs, targets=batch.targets).loss)


# ------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------

def _per_step(steps: list[dict[str, int]], kind: str) -> tuple[int, bool]:
    """Bytes per step of one collective kind, and whether every step issued the same."""
    values = [s.get(kind, 0) for s in steps]
    return (values[0] if values else 0), len(set(values)) <= 1


def _assemble(cfg, plan, strategy, backend, world, dev, groups, params, calls, ranks, tied_shape) -> dict[str, Any]:
    tokens_per_round = world * plan.batch_size * plan.seq_len * plan.steps
    nodes = len({r["node"] for r in ranks})
    # Lockstep: a round lasts as long as its slowest rank.
    round_s = {n: [max(r["round_ms"][n][i] for r in ranks) / 1e3 for i in range(plan.rounds)] for n in VARIANTS}
    rates = {n: [[tokens_per_round / s] for s in round_s[n]] for n in VARIANTS}
    est = {n: stats.estimate(rates[n]) for n in VARIANTS}
    ratio = stats.ratio(rates["tied"], rates["untied"], paired=True)
    comm: dict[str, dict[str, int]] = {n: {} for n in VARIANTS}
    steady = True
    for n in VARIANTS:
        for kind in COLLECTIVES[strategy]:
            per = [_per_step(r["comm_steps"][n], kind) for r in ranks]
            comm[n][kind] = per[0][0]
            steady &= all(ok for _, ok in per) and len({b for b, _ in per}) == 1
        comm[n]["total"] = sum(comm[n][k] for k in COLLECTIVES[strategy])
    checks = {
        f"tied still tied on every rank after {ranks[0]['steps_done']['tied']} steps": all(r["tied_intact"]
                                                                                          for r in ranks),
        "untied diverged on every rank": all(r["untied_diverged"] for r in ranks),
        "losses finite on every rank": all(all(r["losses_finite"].values()) for r in ranks),
        "same bytes communicated in every step, on every rank": steady,
    }
    for n in VARIANTS:
        losses = {r["probe_loss"][n] for r in ranks}
        checks[f"{n}: identical loss on every rank on a shared batch after the steps"] = len(losses) == 1
    notes = []
    silent = strategy == "fsdp2" and world == 1
    if silent:
        # torch's FSDPParamGroup skips the all-gather (it copies the shard) and the reduce-scatter at world size 1.
        notes.append("one rank: FSDP2 issues no all-gather and no reduce-scatter (torch skips them at world size "
                     "1), so 0 bytes cross and the byte checks do not apply; throughput and memory are those of "
                     "FSDP2's code path on one device. Run 2 or more ranks for the communication figures")
        checks["no collective issued on one rank (FSDP2 skips them)"] = all(comm[n]["total"] == 0 for n in VARIANTS)
    elif tied_shape is not None:
        # One copy of the tied weight crosses in each collective kind; FSDP2 pads a parameter's first
        # dimension to a multiple of the world size, and gathers in the policy's param_dtype.
        rows = -(-tied_shape[0] // world) * world if strategy == "fsdp2" else tied_shape[0]
        for kind in COLLECTIVES[strategy]:
            size = 2 if kind == "all_gather" and plan.dtype != "fp32" else 4
            expected = rows * tied_shape[1] * size
            diff = comm["untied"][kind] - comm["tied"][kind]
            checks[f"{kind.replace('_', '-')}: untied - tied = {diff:,} bytes, one copy of the tied weight "
                   f"({rows:,} x {tied_shape[1]:,} x {size} bytes)"] = diff == expected
    return {
        "header": {
            "title": f"tiecheck bench: {plan.model}, train, {strategy} on {world} rank(s) on {nodes} node(s) "
                     f"({backend}), batch {plan.batch_size} x {plan.seq_len} tokens per rank, {plan.dtype}, "
                     f"{dev.type}",
            "command": cfg.get("command"),
            "strategy": strategy, "backend": backend, "world_size": world, "nodes": nodes, "device": dev.type,
            "device_name": D.device_name(dev), "model": plan.model, "overrides": dict(plan.overrides),
            "dtype": plan.dtype, "precision": precision_line(strategy, plan.dtype),
            "batch_size_per_rank": plan.batch_size, "seq_len": plan.seq_len,
            "rounds": plan.rounds, "steps_per_round": plan.steps, "warmup_steps": plan.warmup, "seed": plan.seed,
            "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__, "tiecheck": __version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wrap": calls,
            "tie_groups": [list(g) for g in groups], "tied_weight_shape": tied_shape,
            "rank0_host": ranks[0]["host"], "rank0_output": ranks[0]["output"],
        },
        "tokens_per_s": {n: asdict(est[n]) for n in VARIANTS},
        "tokens_per_s_ratio": asdict(ratio),
        "comm_bytes_per_step": comm,
        "params": params,
        "ranks": [{"rank": r["rank"], "node": r["node"], "state_bytes": r["state_bytes"], "peak_bytes": r["peak_bytes"],
                   "median_round_ms": {n: sorted(r["round_ms"][n])[len(r["round_ms"][n]) // 2] for n in VARIANTS}}
                  for r in ranks],
        "checks": checks,
        "notes": notes,
        "verdict": _verdict(est, ratio, comm, strategy, ranks, silent),
    }


def _verdict(est, ratio, comm, strategy, ranks, silent) -> str | None:
    """Throughput, memory and communication joined in one line, as the single-device bench ends."""
    parts = [stats.verdict(ratio, "tokens/s (all ranks)", lower_is_better=False)]
    t, u = (ranks[0]["state_bytes"][n]["total"] for n in VARIANTS)
    parts.append(bytes_verdict(t, u, "weights+grads+AdamW state per rank"))
    if ranks[0]["peak_bytes"]["tied"] is not None:
        parts.append(bytes_verdict(ranks[0]["peak_bytes"]["tied"], ranks[0]["peak_bytes"]["untied"],
                                   "peak device memory of rank 0"))
    if not silent and comm["untied"]["total"]:
        parts.append(bytes_verdict(comm["tied"]["total"], comm["untied"]["total"], "bytes communicated per step"))
    return stats.join_verdicts(parts)


def render(result: dict[str, Any], fmt: str = "table") -> str:
    """The gathered result as a table (or Markdown, or JSON)."""
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    h = result["header"]
    md = fmt == "markdown"
    tps, ratio = result["tokens_per_s"], result["tokens_per_s_ratio"]
    rows = [["tokens/s (all ranks)", *(f"{tps[n]['median']:,.0f} [{tps[n]['low']:,.0f}, {tps[n]['high']:,.0f}]"
                                       for n in VARIANTS),
             f"{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"]]
    comm = result["comm_bytes_per_step"]
    for kind in [*COLLECTIVES[h["strategy"]], "total"]:
        t, u = comm["tied"][kind], comm["untied"][kind]
        rows.append([f"{kind.replace('_', '-')} bytes/step per rank", f"{t:,} ({human_bytes(t)})",
                     f"{u:,} ({human_bytes(u)})", f"{t / u:.3f}" if u else ""])
    rows.append(["parameters (counted once)", *(f"{result['params'][n]:,}" for n in VARIANTS),
                 f"{result['params']['tied'] / result['params']['untied']:.3f}"])
    for r in result["ranks"]:
        st = [r["state_bytes"][n]["total"] for n in VARIANTS]
        rows.append([f"rank {r['rank']}: weights+grads+AdamW", *(human_bytes(b) for b in st), f"{st[0] / st[1]:.3f}"])
        if r["peak_bytes"]["tied"] is not None:
            pk = [r["peak_bytes"][n] for n in VARIANTS]
            rows.append([f"rank {r['rank']}: peak device memory", *(human_bytes(b) for b in pk), f"{pk[0] / pk[1]:.3f}"])
    table = tabulate(rows, headers=["", "tied", "untied", "tied/untied"], tablefmt="github" if md else "simple")
    lines = [("# " if md else "") + h["title"], ""]
    info = [f"command: {h['command']}", f"torch {h['torch']}, tiecheck {h['tiecheck']}, {h['date']}",
            f"device: {h['device_name']} ({h['threads_per_rank']} thread(s) per rank); {h['world_size']} rank(s) on "
            f"{h['nodes']} node(s)",
            f"precision: {h['precision']}",
            f"protocol: {h['warmup_steps']} warm-up steps, {h['rounds']} rounds x {h['steps_per_round']} steps, "
            "order A B | B A ..., same seed on every rank, rank-specific batches; a round's time is its slowest "
            "rank's",
            f"wrap (tied): {'; '.join(h['wrap']['tied'])}",
            "bytes: counted from the collectives issued (DDP: a comm hook on every gradient bucket; FSDP2: "
            "counting all-gather / reduce-scatter installed with set_custom_all_gather/_reduce_scatter): the size "
            "of the all-reduced bucket, of the gathered buffer, of the reduce-scatter input"]
    if h["device"] == "cpu":
        info.append("memory: the rank's own weights, gradients and AdamW state (exact tensor bytes; local shards "
                    "under FSDP2); a CPU has no device peak counter")
    else:
        info.append("memory: the rank's own weights, gradients and AdamW state (exact tensor bytes; local shards "
                    "under FSDP2); peak: the most a variant's steps allocated above what was resident (both "
                    "variants are), smallest over the rounds, plus that variant's weights and AdamW state")
    lines += [f"- {i}" if md else i for i in info]
    lines += ["", table, ""]
    for name, ok in result["checks"].items():
        lines.append(f"{'- ' if md else ''}{'PASS' if ok else 'FAIL'}  {name}")
    for note in result.get("notes", []):
        lines.append(f"{'- ' if md else ''}note: {note}")
    if result.get("verdict"):
        lines += ["", f"**{result['verdict']}**" if md else result["verdict"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The worker's entry point under ``torch.distributed.run``."""
    ap = argparse.ArgumentParser(prog="python -m tiecheck.bench.distributed")
    ap.add_argument("--config", required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args(argv)
    try:
        result = worker(json.loads(args.config))
    except TiecheckError as e:
        print(f"tiecheck: error: {e}", file=sys.stderr, flush=True)
        return 2
    if result is None:
        return 0
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        _write(args.result, result)
    elif local_rank == 0 and result["ranks"][0]["node"] != int(os.environ.get("GROUP_RANK", "0")):
        # A node without rank 0: its launcher says where the table is, and whether the checks passed.
        h = result["header"]
        _write(args.result, {"elsewhere": {"node": int(os.environ.get("GROUP_RANK", "0")), "nodes": h["nodes"],
                                           "host": h["rank0_host"], "output": h["rank0_output"],
                                           "passed": all(result["checks"].values())}})
    return 0


def _write(path: str, doc: dict[str, Any]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
