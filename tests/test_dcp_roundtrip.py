"""A tied model trained under FSDP2 on two gloo ranks, saved with torch.distributed.checkpoint, read back.

DCP stores names, not aliases: the folder holds the tied weight twice (equal values), which
`tiecheck inspect` reports as an untied duplicate with the line that re-ties it; loading in place
into a tied model keeps the tie, loading by assignment loses it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tiecheck import analyze, models

from support.processes import free_port, run_group

SCRIPT = Path(__file__).parent / "support" / "dcp_roundtrip.py"
OVERRIDES = {"n_layer": 1}
PAIR = {"lm_head.weight", "transformer.wte.weight"}




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp")
    out, result = tmp / "ckpt", tmp / "found.json"
    code, log = run_group([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                           str(SCRIPT), str(out), "--n-layer", "1", "--result", str(result)])
    assert code == 0, log[-3000:]
    return out, json.loads(result.read_text())


@pytest.mark.distributed
def test_fsdp2_keeps_the_tie_through_training_and_an_in_place_dcp_load(checkpoint):
    _, found = checkpoint
    assert found["tie_groups"] == [["transformer.wte.weight", "lm_head.weight"]]
    assert found["world_size"] == 2
    assert found["steps"] == 2
    assert found["trained_tied"]
    assert found["reloaded_in_place_tied"]
    assert found["reloaded_equals_trained"]


@pytest.mark.distributed
def test_inspect_reads_the_sharded_checkpoint_and_reports_the_tie_stored_twice(checkpoint):
    path, _ = checkpoint
    report = analyze(path)
    assert report.tie_groups == ()  # DCP records no aliasing
    tc005 = [f for f in report.findings if f.code == "TC005"]
    assert len(tc005) == 1
    assert set(tc005[0].names) == PAIR
    assert "model.lm_head.weight = model.transformer.wte.weight" in tc005[0].hint
    assert any("copied together from their mapped chunks" in n for n in report.source.notes)


@pytest.mark.distributed
def test_loading_back_in_place_keeps_the_tie_and_by_assignment_loses_it(checkpoint, tmp_path):
    path, _ = checkpoint
    model = models.build("gpt-mini", tied=True, device="cpu", seed=7, **OVERRIDES)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(path))  # no process group: one process reads every shard
    model.load_state_dict(state)
    assert model.lm_head.weight is model.transformer.wte.weight

    dcp_to_torch_save(str(path), str(tmp_path / "full.pt"))
    assigned = models.build("gpt-mini", tied=True, device="meta", **OVERRIDES)
    assigned.load_state_dict(torch.load(tmp_path / "full.pt"), assign=True)
    assert assigned.lm_head.weight is not assigned.transformer.wte.weight
    assert torch.equal(assigned.lm_head.weight, model.lm_head.weight)
    codes = {f.code for f in analyze(assigned).findings}
    assert "TC005" in codes
