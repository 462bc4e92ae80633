"""`--key optimizer` names optimizer state, not a model: refuse in one line listing the model states."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from tiecheck.cli import main

import support.models as tm


@pytest.fixture
def ckpt(tmp_path):
    model = tm.tied()
    # AdamW's state_dict() after one step, written out: building torch.optim.AdamW costs seconds of imports.
    params = list(model.parameters())
    optimizer = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                               "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01,
                                   "params": list(range(len(params)))}]}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer, "ema": model.state_dict(), "epoch": 3}, path)
    return path


@pytest.mark.parametrize("key", ["optimizer", "optimizer.state"])
def test_optimizer_state_is_refused_with_the_model_keys(ckpt, key):
    res = CliRunner().invoke(main, ["inspect", str(ckpt), "--key", key])
    assert res.exit_code == 2
    assert res.output == (f"tiecheck: error: {ckpt}: key '{key}' holds optimizer state (torch.optim "
                          f"state_dict: per-parameter step and moments), not model weights; the model states in "
                          f"this file: model, ema (e.g. --key model)\n")


def test_a_mistyped_key_gets_a_suggestion(ckpt):
    res = CliRunner().invoke(main, ["inspect", str(ckpt), "--key", "modle"])
    assert res.exit_code == 2
    assert "no key 'modle'" in res.output
    assert "did you mean 'model'?" in res.output
    assert res.output.count("\n") == 1


def test_the_model_key_still_works(ckpt):
    res = CliRunner().invoke(main, ["inspect", str(ckpt), "--key", "model", "--no-flops"])
    assert res.exit_code == 0
    assert "Tie groups (1)" in res.output
