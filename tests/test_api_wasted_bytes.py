"""summary.bytes_wasted_by_duplicates: one definition (broken ties and copies, not constant-valued
groups), the same in the table, Markdown and JSON."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from tiecheck.cli import main

import support.models as tm


def _inspect(target: str, fmt: str) -> str:
    res = CliRunner().invoke(main, ["inspect", target, "--no-flops", "--format", fmt])
    assert res.exit_code in (0, 1), res.output
    return res.output


def test_a_fresh_model_wastes_nothing_in_every_format(tmp_path):
    # A fresh model: its LayerNorm weights are all ones, equal by construction, not wasted copies.
    path = tmp_path / "fresh.pt"
    torch.save(tm.tied().state_dict(), path)
    report = json.loads(_inspect(str(path), "json"))
    assert [d["constant"] for d in report["untied_duplicates"]] == [True, True]
    assert report["summary"]["bytes_wasted_by_duplicates"] == 0
    assert "Untied duplicates (0)" in _inspect(str(path), "table")
    assert "## Untied duplicates (0)" in _inspect(str(path), "markdown")


def test_a_broken_tie_counts_its_copy_once_in_every_format(tmp_path):
    path = tmp_path / "broken.pt"
    torch.save(tm.broken().state_dict(), path)
    report = json.loads(_inspect(str(path), "json"))
    assert report["summary"]["bytes_wasted_by_duplicates"] == 64 * 16 * 4
    assert "Untied duplicates (1, 4.00 KiB wasted)" in _inspect(str(path), "table")
    assert "## Untied duplicates (1, 4.00 KiB wasted)" in _inspect(str(path), "markdown")
