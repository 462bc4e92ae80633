"""The multi-process bench's byte accounting in the default run: no processes launched.

torch's fake process group (``torch.testing._internal.distributed.fake_pg``) lets one process be
rank 0 of a world of any size: FSDP2 shards, pads and issues every collective as it would there,
and the bench's counters see each buffer; the collectives themselves move nothing. The world size
3 does not divide gpt-mini's vocabulary (8,192), so FSDP2 pads the tied weight's rows, and the
expected difference must be the padded one -- read from torch's own FSDP2 state, not assumed.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.testing._internal.distributed.fake_pg import FakeStore

from tiecheck.bench import distributed

V, D_MODEL = 8192, 128  # gpt-mini's vocabulary and width
CFG = {"device": "cpu", "batch_size": 2, "seq_len": 16, "rounds": 2, "steps": 1, "warmup": 2,
       "overrides": {"n_layer": 1}, "command": "test", "threads": 1}


@pytest.fixture
def fake_world(monkeypatch):
    """This process as rank 0 of a fake world of 3; every rank reports what rank 0 saw."""
    def world(size: int):
        dist.init_process_group("fake", rank=0, world_size=size, store=FakeStore())
        # The fake group gathers nothing: each rank would have counted what this one counts.
        monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(
            slice(None), [obj] * len(out)))
        return size

    before = torch.get_num_threads()
    yield world
    if dist.is_initialized():
        dist.destroy_process_group()
    torch.set_num_threads(before)


def _padded_rows(module: torch.nn.Module, name: str, world: int) -> int:
    """The rows FSDP2 pads ``name`` to, asked of torch: its padded shard's rows times the world size."""
    for m in module.modules():
        state = m._get_fsdp_state() if isinstance(m, FSDPModule) else None
        group = state._fsdp_param_group if state is not None else None
        for p in group.fsdp_params if group is not None else ():
            info = p._module_info  # the module and attribute the FSDPParam stands for
            if getattr(info.module, info.param_name) is module.get_parameter(name):
                return p.padded_sharded_param_size[0] * world
    raise AssertionError(f"{name} is not an FSDP2 parameter")


@pytest.mark.parametrize(("world", "dtype"), [(3, "fp32"), (3, "bf16"), (2, "fp32")])
def test_fsdp2_counts_one_padded_copy_of_the_tied_weight(fake_world, monkeypatch, world, dtype):
    fake_world(world)
    seen = {}
    wrap = distributed._wrap

    def keep(module, strategy, dev, counter, dtype="fp32"):
        out = wrap(module, strategy, dev, counter, dtype)
        seen.setdefault("tied" if "tied" not in seen else "untied", module)
        return out

    monkeypatch.setattr(distributed, "_wrap", keep)
    result = distributed._work({**CFG, "strategy": "fsdp2", "dtype": dtype}, "fsdp2", torch.device("cpu"), "fake")
    [name, *_] = result["header"]["tie_groups"][0]
    rows = _padded_rows(seen["tied"], name, world)
    assert rows == -(-V // world) * world
    assert (rows == V) == (V % world == 0)
    comm = result["comm_bytes_per_step"]
    gather_size = 2 if dtype == "bf16" else 4
    assert comm["untied"]["all_gather"] - comm["tied"]["all_gather"] == rows * D_MODEL * gather_size
    assert comm["untied"]["reduce_scatter"] - comm["tied"]["reduce_scatter"] == rows * D_MODEL * 4  # fp32 reduction
    assert {k: v for k, v in result["checks"].items() if "identical loss on every rank" in k} == {
        "tied: identical loss on every rank on a shared batch after the steps": True,
        "untied: identical loss on every rank on a shared batch after the steps": True,
    }  # every rank of the fake group is this one
    assert result["checks"]["same bytes communicated in every step, on every rank"] is True
    checks = {k: v for k, v in result["checks"].items() if "one copy of the tied weight" in k}
    assert checks == {
        f"all-gather: untied - tied = {rows * D_MODEL * gather_size:,} bytes, one copy of the tied weight "
        f"({rows:,} x {D_MODEL:,} x {gather_size} bytes)": True,
        f"reduce-scatter: untied - tied = {rows * D_MODEL * 4:,} bytes, one copy of the tied weight "
        f"({rows:,} x {D_MODEL:,} x 4 bytes)": True,
    }


def _allreduce_in_place(_state, bucket):
    """The fake group's all-reduce future carries no tensor: every rank holds the same gradients here,
    so the averaged bucket is the bucket itself."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def test_ddp_counts_one_unpadded_copy_of_the_tied_weight(fake_world, monkeypatch):
    fake_world(3)
    monkeypatch.setattr(distributed.default_hooks, "allreduce_hook", _allreduce_in_place)
    result = distributed._work({**CFG, "strategy": "ddp"}, "ddp", torch.device("cpu"), "fake")
    comm = result["comm_bytes_per_step"]
    assert comm["untied"]["all_reduce"] - comm["tied"]["all_reduce"] == V * D_MODEL * 4
    assert comm["tied"]["all_reduce"] == result["params"]["tied"] * 4  # every gradient, all-reduced once
    assert result["checks"][f"all-reduce: untied - tied = {V * D_MODEL * 4:,} bytes, one copy of the tied weight "
                            f"({V:,} x {D_MODEL:,} x 4 bytes)"]


def test_bytes_per_step_are_the_first_steps_and_steady_only_when_every_step_agrees():
    assert distributed._per_step([{"all_gather": 5}, {"all_gather": 5}], "all_gather") == (5, True)
    assert distributed._per_step([{"all_gather": 5}, {"all_gather": 6}], "all_gather") == (5, False)
    assert distributed._per_step([{"all_gather": 5}, {}], "all_gather") == (5, False)
    assert distributed._per_step([], "all_gather") == (0, True)


def test_a_rank_that_communicated_other_bytes_fails_the_steady_check(fake_world, monkeypatch):
    fake_world(3)

    def gather_with_one_rank_off(out, obj, group=None):
        other = {**obj, "comm_steps": {n: [dict(s) for s in steps] for n, steps in obj["comm_steps"].items()}}
        for step in other["comm_steps"]["tied"]:  # steady on its own, but not the others' figure
            step["all_gather"] += 4
        out[:] = [obj, other, obj]

    monkeypatch.setattr(dist, "all_gather_object", gather_with_one_rank_off)
    result = distributed._work({**CFG, "strategy": "fsdp2"}, "fsdp2", torch.device("cpu"), "fake")
    assert result["checks"]["same bytes communicated in every step, on every rank"] is False


class _TickTimer(distributed.D.PhaseTimer):
    """torch's CPU timer with a clock that moves one second per mark, so a round's time counts its marks."""

    def mark(self) -> None:
        self._marks.append(float(len(self._marks)))


def test_each_round_starts_together_and_is_timed_from_its_first_step(fake_world, monkeypatch, capsys):
    """The ddp run of CFG: 2 warm-up steps and 2 rounds of 1 step per variant, 8 in all, one progress line of
    rank 0 each (rounds in the A B | B A order); a barrier before each variant's round; a round timed from
    before its first step (the start and a step's forward, backward and update: three intervals); the
    bench's own AdamW; and the threads the run was given."""
    fake_world(3)
    torch.set_num_threads(2)  # 1 is asked for; the fixture restores the count it found
    monkeypatch.setattr(distributed.default_hooks, "allreduce_hook", _allreduce_in_place)
    monkeypatch.setattr(distributed.D, "PhaseTimer", _TickTimer)
    barriers, adamw = [], []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(1))
    make_adamw = distributed.D.make_adamw
    monkeypatch.setattr(distributed.D, "make_adamw", lambda *a, **k: adamw.append(1) or make_adamw(*a, **k))
    result = distributed._work({**CFG, "strategy": "ddp"}, "ddp", torch.device("cpu"), "fake")
    lines = [x.removeprefix(distributed.PROGRESS + " ") for x in capsys.readouterr().out.splitlines()
             if x.startswith(distributed.PROGRESS)]
    assert lines == ["0/8 building both variants", "1/8 warm-up tied", "2/8 warm-up tied", "3/8 warm-up untied",
                     "4/8 warm-up untied", "5/8 round 1/2 tied", "6/8 round 1/2 untied", "7/8 round 2/2 untied",
                     "8/8 round 2/2 tied"]
    assert len(barriers) == 4  # two rounds of two variants
    assert len(adamw) == 2  # DDP's plain parameters take the bench's AdamW (fused where the device has it)
    assert result["ranks"][0]["median_round_ms"] == {"tied": 3000.0, "untied": 3000.0}
    assert result["header"]["threads_per_rank"] == 1
    assert "tied still tied on every rank after 4 steps" in result["checks"]
