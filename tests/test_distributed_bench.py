"""`tiecheck bench --nproc-per-node 2`: DDP and FSDP2 on two gloo processes, bytes counted from the collectives.

Each run launches torch.distributed.run (three Python processes importing torch): about half a
minute each on two cores, so they are marked ``distributed`` and run apart from the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from tiecheck.bench import device as D
from tiecheck.bench import distributed
from tiecheck.bench.launcher import Launch, launch
from tiecheck.cli.main import main
from tiecheck.errors import TiecheckError

from support.processes import free_port, run_group

V, D_MODEL = 8192, 128  # gpt-mini's vocabulary and width: the tied weight is V x d fp32
TIED_WEIGHT_BYTES = V * D_MODEL * 4
SMALL = ["--batch-size", "2", "--seq-len", "16", "--rounds", "2", "--steps", "1", "--warmup", "2"]




MiB = 1 << 20
TINY_CFG = {"device": "cpu", "batch_size": 2, "seq_len": 16, "rounds": 2, "steps": 1, "warmup": 2,
            "overrides": {"n_layer": 1}, "command": "test", "threads": 1}


@pytest.fixture
def one_rank(monkeypatch):
    """torch.distributed.run's environment for a single rank of this process (gloo, a free port)."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class ResidentAllocator:
    """A device's allocator counters: both variants' weights and AdamW state always resident (``resident``),
    and every forward allocating ``step`` bytes (or the bytes it is given) for the step's duration."""

    def __init__(self, resident: int, step: int) -> None:
        self.now, self.peak, self.step = resident, resident, step

    def forward(self, step: int | None = None) -> None:
        self.peak = max(self.peak, self.now + (self.step if step is None else step))

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(D, "memory_allocated", lambda dev: self.now)
        monkeypatch.setattr(D, "max_memory_allocated", lambda dev: self.peak)
        monkeypatch.setattr(D, "reset_peak_memory", lambda dev: setattr(self, "peak", self.now))


def test_each_variants_peak_is_its_own_not_both_variants_resident(one_rank, monkeypatch):
    """Both variants stay resident through the rounds; a variant's peak is its steps above that plus its own state.

    The old reading (the counter's absolute maximum) gave both variants the same figure: 1 GiB of the two
    models resident plus the step, a tied/untied ratio of 1. The untied steps allocate 2 MiB more here, so
    a peak not reset before each variant's round would give the tied one the untied steps' figure.
    """
    fake = ResidentAllocator(resident=1 << 30, step=10 * MiB)
    fake.install(monkeypatch)
    from tiecheck import models  # noqa: PLC0415 - the builder patched below is the bundled one

    build = models.build
    step = {True: 10 * MiB, False: 12 * MiB}

    def counted(*args, **kwargs):
        m = build(*args, **kwargs)
        m.register_forward_pre_hook(lambda module, inputs: fake.forward(step[kwargs["tied"]]))
        return m

    monkeypatch.setattr(models, "build", counted)
    result = distributed.worker({**TINY_CFG, "strategy": "ddp"})
    rank = result["ranks"][0]
    for name, tied in (("tied", True), ("untied", False)):
        state = rank["state_bytes"][name]
        assert rank["peak_bytes"][name] == step[tied] + state["weights"] + state["optimizer"]
    tied, untied = rank["peak_bytes"]["tied"], rank["peak_bytes"]["untied"]
    assert untied - tied == 2 * MiB + rank["state_bytes"]["untied"]["weights"] - \
        rank["state_bytes"]["tied"]["weights"] + rank["state_bytes"]["untied"]["optimizer"] - \
        rank["state_bytes"]["tied"]["optimizer"]
    assert "peak device memory of rank 0: tied saves" in result["verdict"]


def test_fsdp2_on_one_rank_passes_and_says_no_collective_is_issued(one_rank):
    """One GPU is all some machines have: FSDP2 on one rank counts 0 bytes (torch skips its collectives),
    and that is what the result says, not two failed byte checks."""
    result = distributed.worker({**TINY_CFG, "strategy": "fsdp2"})
    assert result["comm_bytes_per_step"]["tied"]["total"] == result["comm_bytes_per_step"]["untied"]["total"] == 0
    assert all(result["checks"].values()), result["checks"]
    assert "no collective issued on one rank (FSDP2 skips them)" in result["checks"]
    assert any("torch skips them at world size 1" in n for n in result["notes"])
    assert result["header"]["nodes"] == 1
    assert result["header"]["world_size"] == 1
    assert "note: one rank: FSDP2 issues no all-gather" in distributed.render(result)


def test_launch_options_without_nproc_per_node_are_refused():
    runner = CliRunner()
    for extra in (["--nnodes", "2"], ["--rdzv-endpoint", "h:1"], ["--strategy", "fsdp2"], ["--node-rank", "1"],
                  ["--rdzv-id", "x"], ["--max-restarts", "1"], ["--timeout", "5"]):
        res = runner.invoke(main, ["bench", "--device", "cpu", *extra])
        assert res.exit_code == 2, (extra, res.output)
        assert "only with --nproc-per-node N" in res.output, (extra, res.output)
        assert extra[0] in res.output


def test_more_processes_than_gpus_is_refused_before_launching(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    res = CliRunner().invoke(main, ["bench", "--nproc-per-node", "2", "--model", "gpt-mini"])
    assert res.exit_code == 2, res.output
    assert "--nproc-per-node 2: this node has 1 GPU(s) visible and each rank takes one; use --nproc-per-node 1" \
        in res.output


def test_torchrun_options_passed_through():
    assert Launch(2).torchrun_args() == ["--standalone", "--nproc-per-node", "2"]
    assert Launch(8, "2", "node0:29500", rdzv_id="job7", max_restarts=1).torchrun_args() == [
        "--nnodes", "2", "--rdzv-endpoint", "node0:29500", "--rdzv-backend", "c10d", "--rdzv-id", "job7",
        "--max-restarts", "1", "--nproc-per-node", "8"]
    # torchrun reads --node-rank only with its static rendezvous.
    assert Launch(8, "2", "node0:29500", node_rank=1).torchrun_args() == [
        "--nnodes", "2", "--rdzv-endpoint", "node0:29500", "--rdzv-backend", "static", "--node-rank", "1",
        "--nproc-per-node", "8"]


def test_options_that_cannot_run_on_several_processes_are_refused():
    runner = CliRunner()
    for extra in (["--compile"], ["--mode", "infer"], ["--format", "csv"]):
        res = runner.invoke(main, ["bench", "--nproc-per-node", "2", *extra])
        assert res.exit_code == 2
        assert "not supported with several processes" in res.output
    res = runner.invoke(main, ["bench", "--nproc-per-node", "2", "--nnodes", "2"])
    assert res.exit_code == 2
    assert "give --rdzv-endpoint" in res.output
    res = runner.invoke(main, ["bench", "--nproc-per-node", "2", "--model", "transformer-mini", "--device", "cpu"])
    assert res.exit_code == 2
    assert "runs decoders" in res.output
    assert "running on" not in res.output


@pytest.mark.distributed
def test_ddp_cli_counts_one_tied_weight_less_all_reduced_per_step(tmp_path):
    code, out = run_group([sys.executable, "-m", "tiecheck.cli", "bench", "--nproc-per-node", "2", "--device", "cpu",
                           *SMALL, "--format", "json", "-o", str(tmp_path / "ddp.json")])
    assert code == 0, out[-3000:]
    result = json.loads((tmp_path / "ddp.json").read_text())
    comm = result["comm_bytes_per_step"]
    assert comm["untied"]["all_reduce"] - comm["tied"]["all_reduce"] == TIED_WEIGHT_BYTES
    assert comm["tied"]["all_reduce"] == result["params"]["tied"] * 4  # every gradient, all-reduced once
    assert result["header"]["world_size"] == 2
    assert result["header"]["backend"] == "gloo"
    assert all(result["checks"].values()), result["checks"]


@pytest.mark.distributed
def test_fsdp2_gathers_and_reduce_scatters_one_copy_of_the_tied_weight():
    cfg = {"strategy": "fsdp2", "device": "cpu", "batch_size": 2, "seq_len": 16, "rounds": 2, "steps": 1,
           "warmup": 2, "overrides": {"n_layer": 1}, "command": "test"}
    result = launch(cfg, nproc_per_node=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", timeout=90)
    comm = result["comm_bytes_per_step"]
    assert comm["untied"]["all_gather"] - comm["tied"]["all_gather"] == TIED_WEIGHT_BYTES
    assert comm["untied"]["reduce_scatter"] - comm["tied"]["reduce_scatter"] == TIED_WEIGHT_BYTES
    # The planner's blocks policy: the tied embedding and head stay with the root unit.
    assert result["header"]["wrap"]["tied"] == ["fully_shard(model.transformer.h[0])", "fully_shard(model)"]
    assert all(result["checks"].values()), result["checks"]
    shards = [r["state_bytes"]["tied"]["weights"] for r in result["ranks"]]
    assert sum(shards) == result["params"]["tied"] * 4  # each rank holds half the weights


@pytest.mark.distributed
def test_fsdp2_bf16_gathers_half_the_bytes_through_its_mixed_precision_policy():
    cfg = {**TINY_CFG, "strategy": "fsdp2", "dtype": "bf16"}
    result = launch(cfg, nproc_per_node=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", timeout=120)
    comm = result["comm_bytes_per_step"]
    assert comm["untied"]["all_gather"] - comm["tied"]["all_gather"] == TIED_WEIGHT_BYTES // 2  # bf16 parameters
    assert comm["untied"]["reduce_scatter"] - comm["tied"]["reduce_scatter"] == TIED_WEIGHT_BYTES  # fp32 reduction
    assert "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)" in result["header"]["precision"]
    assert all(result["checks"].values()), result["checks"]


@pytest.mark.distributed
def test_rank0_progress_is_streamed_and_a_timeout_stops_every_worker():
    seen: list[tuple[int, int, str]] = []
    result = launch({**TINY_CFG, "strategy": "ddp"}, nproc_per_node=2, rdzv_endpoint=f"127.0.0.1:{free_port()}",
                    timeout=120, progress=lambda done, total, label: seen.append((done, total, label)))
    assert seen[0][2] == "building both variants"
    assert seen[-1][0] == seen[-1][1]
    assert [label for _, _, label in seen].count("warm-up tied") == 2  # rank 0 only, one line per step
    assert all(result["checks"].values())
    with pytest.raises(TiecheckError, match=r"did not finish within 2 s \(--timeout\); stopped"):
        launch({**TINY_CFG, "strategy": "ddp", "rounds": 50}, nproc_per_node=2,
               rdzv_endpoint=f"127.0.0.1:{free_port()}", timeout=2)


@pytest.mark.distributed
def test_two_nodes_on_localhost_both_exit_0_and_one_writes_the_table(tmp_path):
    """Two launchers, each a "node" of one process, meet at one rendezvous: the node that holds rank 0 writes
    the table, the other says where it is; both exit 0 (under SLURM the job succeeds)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for node in "ab":
        cmd = [sys.executable, "-m", "tiecheck.cli", "bench", "--nproc-per-node", "1", "--nnodes", "2",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--device", "cpu", *SMALL,
               "--timeout", "150", "--format", "json", "-o", str(tmp_path / f"{node}.json")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=200)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    written = [n for n in "ab" if (tmp_path / f"{n}.json").exists()]
    assert len(written) == 1, outs
    result = json.loads((tmp_path / f"{written[0]}.json").read_text())
    assert result["header"]["nodes"] == 2
    assert result["header"]["world_size"] == 2
    other = outs["ab".index("b" if written == ["a"] else "a")]
    line = next(x for x in other.splitlines() if "done; the results are written by the node of rank 0" in x)
    assert line.startswith("tiecheck: node 1 of 2 done")
    assert f"{written[0]}.json" in line
    assert "every check passed" in line
