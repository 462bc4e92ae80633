"""The small frictions a new user met on the everyday path: what the headers and tables say."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tiecheck.bench.converge_settings import ConvergeConfig, resolve
from tiecheck.cli.main import main

transformers = pytest.importorskip("transformers")
from support.hf import tiny_llama  # noqa: E402 - after the skip: needs transformers


def test_the_inspect_header_never_counts_tie_groups_the_report_does_not_show(tmp_path, quiet_transformers):
    """A folder declaring its head tied but storing two different copies: the header said "1 tie
    group" above "Tie groups (0)". It now says what the architecture ties, by name."""
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    r = CliRunner().invoke(main, ["inspect", str(tmp_path), "--no-flops"])
    head = r.output.split("Summary")[0]
    assert "Tie groups (0)" in r.output
    assert "tie group" not in head
    assert "it ties lm_head.weight = model.embed_tokens.weight" in head


def test_the_converge_header_shows_config_changes_as_words():
    plan = resolve(ConvergeConfig(quick=True, device="cpu"))
    assert "{" not in plan.description
    assert "'" not in plan.description
    assert plan.description.endswith("Changed: n_layer 2, d_model 64, n_head 2.")


def test_the_plan_table_lists_the_calls_of_an_accepted_plan():
    r = CliRunner().invoke(main, ["plan", "gpt-mini"])
    assert r.exit_code == 0, r.output
    calls = [u["call"] for u in json.loads(CliRunner().invoke(main, ["plan", "gpt-mini", "--format", "json"]).output)
             ["units"]]
    table = r.output.split("calls, in this order:\n", 1)[1].split("ties:")[0]
    assert [line.strip() for line in table.splitlines()] == calls
    assert calls[-1] == "fully_shard(model)"

