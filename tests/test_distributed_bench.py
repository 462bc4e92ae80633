"""`tiecheck bench --nproc-per-node 2`: DDP and FSDP2 on two gloo processes, bytes counted from the collectives.

Each run launches torch.distributed.run (three Python processes importing torch): about half a
minute each on two cores, so they are marked ``distributed`` and run apart from the default suite.
"""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from tiecheck.bench.distributed import launch
from tiecheck.cli.main import main

from support.processes import free_port, run_group

V, D_MODEL = 8192, 128  # gpt-mini's vocabulary and width: the tied weight is V x d fp32
TIED_WEIGHT_BYTES = V * D_MODEL * 4
SMALL = ["--batch-size", "2", "--seq-len", "16", "--rounds", "2", "--steps", "1", "--warmup", "2"]




def test_options_that_cannot_run_on_several_processes_are_refused():
    runner = CliRunner()
    for extra in (["--compile"], ["--mode", "infer"], ["--format", "csv"]):
        res = runner.invoke(main, ["bench", "--nproc-per-node", "2", *extra])
        assert res.exit_code == 2 and "not supported with several processes" in res.output
    res = runner.invoke(main, ["bench", "--nproc-per-node", "2", "--nnodes", "2"])
    assert res.exit_code == 2 and "give --rdzv-endpoint" in res.output
    res = runner.invoke(main, ["bench", "--nproc-per-node", "2", "--model", "transformer-mini", "--device", "cpu"])
    assert res.exit_code == 2 and "runs decoders" in res.output and "running on" not in res.output


@pytest.mark.distributed
def test_ddp_cli_counts_one_tied_weight_less_all_reduced_per_step(tmp_path):
    code, out = run_group([sys.executable, "-m", "tiecheck.cli", "bench", "--nproc-per-node", "2", "--device", "cpu",
                           *SMALL, "--format", "json", "-o", str(tmp_path / "ddp.json")])
    assert code == 0, out[-3000:]
    result = json.loads((tmp_path / "ddp.json").read_text())
    comm = result["comm_bytes_per_step"]
    assert comm["untied"]["all_reduce"] - comm["tied"]["all_reduce"] == TIED_WEIGHT_BYTES
    assert comm["tied"]["all_reduce"] == result["params"]["tied"] * 4  # every gradient, all-reduced once
    assert result["header"]["world_size"] == 2 and result["header"]["backend"] == "gloo"
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
