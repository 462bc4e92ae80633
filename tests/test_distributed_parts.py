"""The multi-process bench's parts that need no process group: the counters, the precision policy and
its words, the tie checks on one rank, rank 0's progress, the worker's device refusals, the result
assembled from recorded collectives and its rendering, and the worker's entry point (what each rank
writes). No process is launched; FSDP2's and DDP's own figures are in test_distributed_accounting.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.testing._internal.distributed.fake_pg import FakeStore

from tiecheck.bench import distributed
from tiecheck.errors import TiecheckError

V, D_MODEL = 8192, 128


# --- the counters ------------------------------------------------------------------------------


def test_the_counter_counts_only_while_counting_and_each_step_starts_from_zero():
    c = distributed.CommCounter()
    c.add("all_gather", 10)
    c.step()
    assert (c.totals, c.steps) == ({}, [])
    c.counting = True
    c.add("all_gather", 10)
    c.add("all_gather", 5)
    c.add("reduce_scatter", 7)
    c.step()
    c.add("all_gather", 1)
    c.step()
    assert c.steps == [{"all_gather": 15, "reduce_scatter": 7}, {"all_gather": 1}]
    assert c.totals == {}
    c.counting = False
    c.add("all_gather", 3)
    c.step()
    assert c.steps == [{"all_gather": 15, "reduce_scatter": 7}, {"all_gather": 1}]


def test_the_counting_collectives_count_and_hand_back_torchs_work():
    """FSDP2 waits on the work an async all-gather or reduce-scatter returns (``unshard(async_op=True)``):
    the counting subclasses must hand back what torch's defaults return, not only count."""
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        c = distributed.CommCounter(counting=True)
        gathered, shard = torch.empty(8), torch.empty(4)
        work = distributed.CountingAllGather(c)(gathered, shard, dist.group.WORLD, async_op=True)
        assert hasattr(work, "wait")
        work = distributed.CountingReduceScatter(c)(shard, gathered, dist.group.WORLD, dist.ReduceOp.SUM,
                                                    async_op=True)
        assert hasattr(work, "wait")
        assert c.totals == {"all_gather": 32, "reduce_scatter": 32}  # the unsharded buffer both ways
        # Without async_op, synchronous as torch's defaults are: no work to wait on.
        assert distributed.CountingAllGather(c)(gathered, shard, dist.group.WORLD) is None
        assert distributed.CountingReduceScatter(c)(shard, gathered, dist.group.WORLD, dist.ReduceOp.SUM) is None
    finally:
        dist.destroy_process_group()


# --- precision ---------------------------------------------------------------------------------


def test_the_mixed_precision_policy_gathers_in_the_16_bit_dtype_and_reduces_in_fp32():
    assert distributed.mixed_precision("fp32") is None
    assert distributed.mixed_precision("bf16") == MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                       reduce_dtype=torch.float32)
    assert distributed.mixed_precision("fp16") == MixedPrecisionPolicy(param_dtype=torch.float16,
                                                                       reduce_dtype=torch.float32)


def test_the_precision_line_names_what_each_strategy_does():
    assert distributed.precision_line("ddp", "fp32") == "fp32 weights, gradients and communication"
    assert distributed.precision_line("fsdp2", "fp32") == "fp32 weights, gradients and communication"
    assert distributed.precision_line("ddp", "bf16") == "bf16 autocast over fp32 weights: DDP all-reduces fp32 gradients"
    assert distributed.precision_line("fsdp2", "bf16").startswith(
        "FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): parameters all-gathered and computed in bf16")


# --- the checks on one rank ----------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.other = nn.Linear(3, 3)
        if tied:
            self.head.weight = self.emb.weight


class _LM(_Tiny):
    """_Tiny as the bench calls a model: ``fn(idx, targets=...)`` with a ``.loss``."""

    def forward(self, idx, targets):
        logits = self.head(self.other(self.emb(idx)))
        return types.SimpleNamespace(loss=nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))


@pytest.mark.parametrize("tied", [True, False])
def test_gradient_bytes_are_read_once_and_the_gradients_dropped(tied):
    from tiecheck.bench.protocol import Batch, Variant  # noqa: PLC0415 - only this test builds a variant

    m = _LM(tied)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    v = Variant(name="tied" if tied else "untied", module=m, fn=m, dev=torch.device("cpu"), dtype="fp32",
                mode="train", optimizer=opt)
    idx = torch.tensor([[0, 1, 2], [3, 2, 1]])
    got = distributed._grad_bytes(v, Batch(inputs=(idx,), targets=idx))
    # Every parameter once (a tied one once): 12 + 9 + 3 fp32 values, and 12 more untied.
    assert got == (24 if tied else 36) * 4
    assert all(p.grad is None for p in m.parameters())  # dropped: the first timed step starts from none
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())  # and no step was taken
    assert opt.state == {}
    state = distributed._state_bytes(m, opt, got)
    assert state == {"weights": got, "grads": got, "optimizer": 0, "total": 2 * got}
    # The probe: the loss on a batch, as a float, without a gradient.
    probe = distributed._probe_loss(v, Batch(inputs=(idx,), targets=idx))
    assert type(probe) is float
    with torch.no_grad():
        assert probe == pytest.approx(float(m(idx, idx).loss))
    assert all(p.grad is None for p in m.parameters())


def test_tie_groups_are_the_names_of_one_parameter():
    assert distributed._groups(_Tiny(tied=True)) == [("emb.weight", "head.weight")]
    assert distributed._groups(_Tiny(tied=False)) == []


def test_a_model_is_tied_only_when_every_group_is_one_parameter():
    tied = _Tiny(tied=True)
    groups = distributed._groups(tied)
    assert distributed._tied(tied, groups)
    assert not distributed._tied(tied, [])  # nothing to be tied: not "still tied"
    assert not distributed._tied(_Tiny(tied=False), groups)
    # One group tied and one not: not tied.
    assert not distributed._tied(tied, [*groups, ("other.weight", "head.weight")])


def test_untied_copies_diverged_only_when_separate_and_different():
    groups = [("emb.weight", "head.weight")]
    untied = _Tiny(tied=False)
    assert distributed._diverged(untied, groups)  # separately initialised: different values
    assert not distributed._diverged(untied, [])
    with torch.no_grad():
        untied.head.weight.copy_(untied.emb.weight)
    assert distributed._diverged(untied, groups) is False  # equal values
    assert not distributed._diverged(_Tiny(tied=True), groups)  # one storage
    shared = _Tiny(tied=False)
    shared.head.weight = nn.Parameter(shared.emb.weight.detach()[:, :])  # a view: same storage, another Parameter
    assert not distributed._diverged(shared, groups)
    # The first group diverged, the second not: not diverged.
    two = _Tiny(tied=False)
    two.other2 = nn.Linear(3, 3)
    with torch.no_grad():
        two.other2.weight.copy_(two.other.weight)
    assert distributed._diverged(two, groups)
    assert not distributed._diverged(two, [*groups, ("other.weight", "other2.weight")])


def test_rank_0_prints_the_running_count_and_other_ranks_nothing(capsys):
    emit = distributed._progress(0, 10)
    emit(0, "building both variants")
    emit(1, "warm-up tied")
    emit(2, "round 1/2 tied")
    assert capsys.readouterr().out.splitlines() == [
        "tiecheck-progress: 0/10 building both variants", "tiecheck-progress: 1/10 warm-up tied",
        "tiecheck-progress: 3/10 round 1/2 tied"]
    other = distributed._progress(1, 10)
    other(1, "warm-up tied")
    assert capsys.readouterr().out == ""


# --- the worker's refusals, before any process group -------------------------------------------


def test_a_device_other_than_cpu_cuda_or_auto_is_refused(monkeypatch):
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("group started"))
    with pytest.raises(TiecheckError, match=r"--device mps: with --nproc-per-node use cpu, cuda or auto"):
        distributed.worker({"strategy": "ddp", "device": "MPS"})


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("group started"))
    with pytest.raises(TiecheckError, match="--device cuda: CUDA is not available here; use --device cpu"):
        distributed.worker({"strategy": "ddp", "device": "cuda"})


@pytest.mark.parametrize("device", ["cuda", "auto", None])
def test_a_local_rank_without_its_gpu_is_refused(monkeypatch, device):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("group started"))
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(TiecheckError, match=r"local rank 2: this node has 2 GPU\(s\) visible"):
        distributed.worker({"strategy": "ddp", "device": device})


def test_a_local_rank_with_its_gpu_takes_it_and_nccl(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    chosen = {}
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda dev: chosen.setdefault("set", dev))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, device_id=None: chosen.update(backend=backend, device_id=device_id))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: chosen.setdefault("destroyed", True))
    monkeypatch.setattr(distributed, "_work", lambda cfg, strategy, dev, backend: (strategy, dev, backend))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.worker({"strategy": "fsdp2", "device": "auto"}) == ("fsdp2", torch.device("cuda", 1), "nccl")
    assert chosen == {"set": torch.device("cuda", 1), "backend": "nccl", "device_id": torch.device("cuda", 1),
                      "destroyed": True}


def test_the_cpu_takes_gloo_and_the_group_is_destroyed_when_the_work_fails(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda dev: pytest.fail("a GPU was taken"))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, device_id=None: calls.append((backend, device_id)))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroyed"))

    def fail(cfg, strategy, dev, backend):
        calls.append((strategy, dev, backend))
        raise TiecheckError("no")

    monkeypatch.setattr(distributed, "_work", fail)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(TiecheckError, match="no"):
        distributed.worker({"strategy": "ddp", "device": "cpu"})
    assert calls == [("gloo", None), ("ddp", torch.device("cpu"), "gloo"), "destroyed"]


# --- the result, from recorded collectives ------------------------------------------------------


def _plan(**kw):
    base = dict(batch_size=2, seq_len=16, steps=1, rounds=2, dtype="fp32", model="gpt-mini", overrides={"n_layer": 1},
                warmup=2, seed=0)
    return types.SimpleNamespace(**{**base, **kw})


def _rank(rank: int, node: int = 0, tied_gather: int = 100, untied_gather: int = 100 + V * D_MODEL * 4,
          peak: int | None = 5_000, round_ms=(10.0, 12.0)) -> dict:
    steps = {"tied": [{"all_gather": tied_gather, "reduce_scatter": tied_gather}] * 2,
             "untied": [{"all_gather": untied_gather, "reduce_scatter": untied_gather}] * 2}
    state = {"tied": {"weights": 100, "grads": 100, "optimizer": 200, "total": 400},
             "untied": {"weights": 200, "grads": 200, "optimizer": 400, "total": 800}}
    return {"rank": rank, "node": node, "host": "h0", "output": "out.json",
            "round_ms": {"tied": list(round_ms), "untied": [2 * x for x in round_ms]},
            "comm_steps": steps, "state_bytes": state,
            "peak_bytes": {"tied": peak, "untied": None if peak is None else 2 * peak},
            "tied_intact": True, "untied_diverged": True, "losses_finite": {"tied": True, "untied": True},
            "probe_loss": {"tied": 1.5, "untied": 1.25}, "steps_done": {"tied": 4, "untied": 4}}


def _assemble(ranks, strategy="fsdp2", plan=None, tied_shape=(V, D_MODEL)):
    world = len(ranks)
    return distributed._assemble({"command": "tiecheck bench"}, plan or _plan(), strategy, "gloo", world,
                                 torch.device("cpu"), [("lm_head.weight", "wte.weight")], {"tied": 10, "untied": 20},
                                 {"tied": ["fully_shard(model)"], "untied": ["fully_shard(model)"]}, ranks,
                                 list(tied_shape) if tied_shape is not None else None)


def test_the_result_of_two_ranks_on_two_nodes():
    r = _assemble([_rank(0, node=0, round_ms=(10.0, 30.0)), _rank(1, node=1, round_ms=(20.0, 15.0))])
    h = r["header"]
    assert h["title"] == ("tiecheck bench: gpt-mini, train, fsdp2 on 2 rank(s) on 2 node(s) (gloo), batch 2 x 16 "
                          "tokens per rank, fp32, cpu")
    assert (h["world_size"], h["nodes"], h["rank0_host"], h["rank0_output"]) == (2, 2, "h0", "out.json")
    assert h["tied_weight_shape"] == [V, D_MODEL]
    assert h["tie_groups"] == [["lm_head.weight", "wte.weight"]]
    # A round lasts as long as its slowest rank: 20 ms and 30 ms for 2 ranks x 2 x 16 tokens x 1 step.
    assert r["tokens_per_s"]["tied"]["median"] == pytest.approx((64 / 0.02 + 64 / 0.03) / 2)
    assert r["tokens_per_s"]["tied"]["rounds"] == 2
    # Untied took twice as long in every round: the paired ratio is 2 in every resample of the rounds.
    assert (r["tokens_per_s_ratio"]["low"], r["tokens_per_s_ratio"]["median"], r["tokens_per_s_ratio"]["high"]) == \
        pytest.approx((2.0, 2.0, 2.0))
    assert r["comm_bytes_per_step"]["tied"] == {"all_gather": 100, "reduce_scatter": 100, "total": 200}
    assert [x["median_round_ms"] for x in r["ranks"]] == [{"tied": 30.0, "untied": 60.0}, {"tied": 20.0, "untied": 40.0}]
    assert all(r["checks"].values()), r["checks"]
    assert "tied still tied on every rank after 4 steps" in r["checks"]
    assert r["notes"] == []


def test_a_rank_whose_check_failed_fails_the_runs_check():
    for key, name in (("tied_intact", "tied still tied on every rank after 4 steps"),
                      ("untied_diverged", "untied diverged on every rank")):
        bad = {**_rank(1), key: False}
        assert _assemble([_rank(0), bad])["checks"][name] is False
    bad = {**_rank(1), "losses_finite": {"tied": True, "untied": False}}
    assert _assemble([_rank(0), bad])["checks"]["losses finite on every rank"] is False
    bad = {**_rank(1), "probe_loss": {"tied": 1.5, "untied": 1.0}}
    checks = _assemble([_rank(0), bad])["checks"]
    assert checks["tied: identical loss on every rank on a shared batch after the steps"] is True
    assert checks["untied: identical loss on every rank on a shared batch after the steps"] is False


def test_the_expected_difference_is_one_padded_copy_for_fsdp2_and_one_copy_for_ddp():
    # 3 ranks: FSDP2 pads 8,192 rows to 8,193.
    padded = 8193 * D_MODEL * 4
    r = _assemble([_rank(i, untied_gather=100 + padded) for i in range(3)])
    assert r["checks"][f"all-gather: untied - tied = {padded:,} bytes, one copy of the tied weight "
                       f"(8,193 x {D_MODEL:,} x 4 bytes)"] is True
    # bf16 gathers 2 bytes a value, and reduce-scatters 4.
    r = _assemble([_rank(i, untied_gather=100 + padded) for i in range(3)], plan=_plan(dtype="bf16"))
    assert r["checks"][f"all-gather: untied - tied = {padded:,} bytes, one copy of the tied weight "
                       f"(8,193 x {D_MODEL:,} x 2 bytes)"] is False
    assert r["checks"][f"reduce-scatter: untied - tied = {padded:,} bytes, one copy of the tied weight "
                       f"(8,193 x {D_MODEL:,} x 4 bytes)"] is True
    # DDP does not pad.
    ddp = [{**_rank(i), "comm_steps": {"tied": [{"all_reduce": 10}], "untied": [{"all_reduce": 10 + V * D_MODEL * 4}]}}
           for i in range(3)]
    r = _assemble(ddp, strategy="ddp")
    assert r["comm_bytes_per_step"]["untied"] == {"all_reduce": 10 + V * D_MODEL * 4, "total": 10 + V * D_MODEL * 4}
    assert r["checks"][f"all-reduce: untied - tied = {V * D_MODEL * 4:,} bytes, one copy of the tied weight "
                       f"({V:,} x {D_MODEL:,} x 4 bytes)"] is True
    # No tie: no byte check.
    assert not any("one copy" in k for k in _assemble([_rank(0), _rank(1)], tied_shape=None)["checks"])


def test_fsdp2_on_one_rank_checks_that_nothing_crossed():
    silent = _assemble([_rank(0, tied_gather=0, untied_gather=0)])
    assert silent["checks"]["no collective issued on one rank (FSDP2 skips them)"] is True
    assert not any("one copy" in k for k in silent["checks"])
    assert silent["notes"][0].startswith("one rank: FSDP2 issues no all-gather and no reduce-scatter")
    assert "bytes communicated per step" not in silent["verdict"]
    loud = _assemble([_rank(0, tied_gather=0, untied_gather=8)])
    assert loud["checks"]["no collective issued on one rank (FSDP2 skips them)"] is False
    assert "bytes communicated per step" not in loud["verdict"]  # one rank: the byte figures do not apply
    # DDP on one rank still all-reduces: no such note.
    ddp = _assemble([{**_rank(0), "comm_steps": {"tied": [{"all_reduce": 10}], "untied": [{"all_reduce": 20}]}}],
                    strategy="ddp")
    assert ddp["notes"] == []
    assert "bytes communicated per step: tied saves 10 B" in ddp["verdict"]


def test_the_verdict_joins_throughput_memory_and_bytes():
    r = _assemble([_rank(0), _rank(1)])
    assert r["verdict"].startswith("verdict: tokens/s (all ranks): too few rounds (2)")
    assert r["verdict"].split("; ")[-3:] == ["weights+grads+AdamW state per rank: tied saves 400 B (50.0% of untied)",
                         "peak device memory of rank 0: tied saves 4.88 KiB (50.0% of untied)",
                         f"bytes communicated per step: tied saves {distributed.human_bytes(2 * V * D_MODEL * 4)} "
                         "(100.0% of untied)"]
    # Six rounds, enough for a verdict: more tokens/s is better.
    rounds = (10.0, 11.0, 12.0, 10.0, 11.0, 12.0)
    six = _assemble([_rank(0, round_ms=rounds), _rank(1, round_ms=rounds)], plan=_plan(rounds=6))
    assert six["verdict"].startswith("verdict: tokens/s (all ranks): tied higher by 100.0% (tied/untied 2.000")
    no_peak = _assemble([_rank(0, peak=None), _rank(1, peak=None)])
    assert "peak device memory" not in no_peak["verdict"]
    none_crossed = _assemble([_rank(0, tied_gather=0, untied_gather=0), _rank(1, tied_gather=0, untied_gather=0)])
    assert "bytes communicated" not in none_crossed["verdict"]


# --- rendering ----------------------------------------------------------------------------------


def test_json_is_the_result_itself():
    r = _assemble([_rank(0), _rank(1)])
    text = distributed.render(r, "json")
    assert text.endswith("}\n")
    assert json.loads(text) == json.loads(json.dumps(r))
    assert text.startswith('{\n  "header": {\n    "title"')


def test_the_table_shows_every_figure_check_and_note():
    r = _assemble([_rank(0), _rank(1, peak=None)])
    text = distributed.render(r)
    lines = text.splitlines()
    assert lines[0] == r["header"]["title"]
    assert "command: tiecheck bench" in lines
    assert "wrap (tied): fully_shard(model)" in lines
    assert "precision: fp32 weights, gradients and communication" in lines
    assert any(x.startswith("memory: ") and "a CPU has no device peak counter" in x for x in lines)
    gather = next(x for x in lines if x.startswith("all-gather bytes/step per rank"))
    assert "100 (100 B)" in gather
    assert "0.000" in gather
    assert next(x for x in lines if x.startswith("parameters (counted once)")).split()[-3:] == ["10", "20", "0.500"]
    assert next(x for x in lines if x.startswith("rank 0: weights+grads+AdamW")).endswith("0.500")
    assert next(x for x in lines if x.startswith("rank 0: peak device memory")).endswith("0.500")
    assert not any(x.startswith("rank 1: peak device memory") for x in lines)
    assert sum(x.startswith("PASS  ") for x in lines) == len(r["checks"])
    assert lines[-1] == r["verdict"]
    failed = {**r, "checks": {"untied diverged on every rank": False}, "notes": ["n1"], "verdict": None}
    text = distributed.render(failed)
    assert "FAIL  untied diverged on every rank" in text.splitlines()
    assert text.splitlines()[-1] == "note: n1"


def test_no_bytes_leave_the_ratio_empty_and_a_gpu_says_how_its_peak_is_read():
    r = _assemble([_rank(0, tied_gather=0, untied_gather=0)])
    r["header"]["device"] = "cuda"
    lines = distributed.render(r).splitlines()
    assert next(x for x in lines if x.startswith("all-gather bytes/step per rank")).rstrip().endswith("0 (0 B)")
    assert any(x.startswith("memory: ") and "smallest over the rounds" in x for x in lines)


def test_markdown_has_a_heading_a_list_and_a_bold_verdict():
    r = _assemble([_rank(0), _rank(1)])
    lines = distributed.render(r, "markdown").splitlines()
    assert lines[0] == "# " + r["header"]["title"]
    assert "- command: tiecheck bench" in lines
    assert "| " in next(x for x in lines if "all-gather bytes/step per rank" in x)
    assert any(x.startswith("- PASS  ") for x in lines)
    assert lines[-1] == f"**{r['verdict']}**"
    r["notes"] = ["n1"]
    assert "- note: n1" in distributed.render(r, "markdown").splitlines()


# --- the entry point ----------------------------------------------------------------------------


def _main(monkeypatch, tmp_path, result, env):
    monkeypatch.setattr(distributed, "worker", lambda cfg: result(cfg) if callable(result) else result)
    for k in ("RANK", "LOCAL_RANK", "GROUP_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "result.json"
    code = distributed.main(["--config", json.dumps({"strategy": "ddp"}), "--result", str(out)])
    return code, out


def test_rank_0_writes_the_result(monkeypatch, tmp_path):
    r = _assemble([_rank(0), _rank(1, node=1)])
    code, out = _main(monkeypatch, tmp_path, r, {})
    assert code == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left


def test_a_node_without_rank_0_says_where_the_table_is(monkeypatch, tmp_path):
    r = _assemble([_rank(0), _rank(1, node=1)])
    code, out = _main(monkeypatch, tmp_path, r, {"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"})
    assert code == 0
    assert json.loads(out.read_text()) == {"elsewhere": {"node": 1, "nodes": 2, "host": "h0", "output": "out.json",
                                                         "passed": True}}
    r["checks"]["untied diverged on every rank"] = False
    code, out = _main(monkeypatch, tmp_path, r, {"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"})
    assert json.loads(out.read_text())["elsewhere"]["passed"] is False


@pytest.mark.parametrize("env", [{"RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "1"},  # not the node's first rank
                                 {"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "0"}])  # rank 0's own node
def test_other_ranks_write_nothing(monkeypatch, tmp_path, env):
    r = _assemble([_rank(0), _rank(1, node=1)])
    code, out = _main(monkeypatch, tmp_path, r, env)
    assert code == 0
    assert not out.exists()


@pytest.mark.parametrize("args", [["--result", "r.json"], ["--config", "{}"]])
def test_the_entry_point_needs_a_config_and_a_result_path(monkeypatch, args):
    monkeypatch.setattr(distributed, "worker", lambda cfg: pytest.fail("ran without its arguments"))
    with pytest.raises(SystemExit) as e:
        distributed.main(args)
    assert e.value.code == 2  # argparse's usage error


def test_the_default_seed_is_the_single_device_benchs():
    from tiecheck.bench.settings import BenchConfig, resolve  # noqa: PLC0415 - only this test resolves a plan

    plan = distributed.resolve_run({"device": "cpu"}, torch.device("cpu"))
    assert plan.seed == resolve(BenchConfig(device="cpu")).seed == 0
    with pytest.raises(TiecheckError, match="the multi-process bench runs decoders"):
        distributed.resolve_run({"model": "transformer-mini"}, torch.device("cpu"))


def test_a_worker_with_nothing_to_say_writes_nothing_and_a_refusal_is_one_line(monkeypatch, tmp_path, capsys):
    code, out = _main(monkeypatch, tmp_path, None, {})
    assert (code, out.exists()) == (0, False)

    def refuse(cfg):
        raise TiecheckError("--device tpu: no")

    code, out = _main(monkeypatch, tmp_path, refuse, {})
    assert (code, out.exists()) == (2, False)
    assert capsys.readouterr().err == "tiecheck: error: --device tpu: no\n"


def test_the_module_run_as_torchrun_runs_it_refuses_in_one_line_and_exits_2(tmp_path):
    """torch.distributed.run starts each worker as ``python -m tiecheck.bench.distributed``: the module's
    own entry point, here refusing a device before any process group is made."""
    out = tmp_path / "result.json"
    res = subprocess.run([sys.executable, "-m", "tiecheck.bench.distributed", "--config",
                          json.dumps({"strategy": "ddp", "device": "tpu"}), "--result", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == ["tiecheck: error: --device tpu: with --nproc-per-node use cpu, cuda or auto "
                                       "(each rank takes the GPU of its LOCAL_RANK)"]
    assert not out.exists()


def test_progress_is_flushed_line_by_line_so_a_killed_worker_has_shown_how_far_it_got():
    """The launcher reads rank 0's stdout through a pipe, where Python buffers: a worker killed at its
    --timeout (``os._exit`` here, which flushes nothing) must already have written every line."""
    code = ("import os; from tiecheck.bench.distributed import _progress; emit = _progress(0, 4); "
            "emit(1, 'warm-up tied'); emit(1, 'warm-up tied'); os._exit(0)")
    # The launcher also sets PYTHONUNBUFFERED for its workers; a worker started by torchrun directly is not.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.stdout.splitlines() == ["tiecheck-progress: 1/4 warm-up tied", "tiecheck-progress: 2/4 warm-up tied"]
