"""tiecheck diff: ties kept, lost (and how), added, and changed in shape or dtype."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tiecheck
from tiecheck.cli import main
from tiecheck.compare import render_diff
from tiecheck.compare.tie_diff import KindChange, NameInB

from support.checkpoints import write_safetensors
from support.models import BertLikeMLM, TinyLM


@pytest.fixture
def tied():
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def broken(tied):
    """The same weights after load_state_dict(assign=True): the tie became two equal copies."""
    m = TinyLM()
    m.load_state_dict({k: v.clone() for k, v in tied.state_dict().items()}, assign=True)
    return m


def test_identical_ties_exit_0(tied):
    d = tiecheck.diff(tied, tied)
    assert d.exit_code == 0
    assert d.lost == ()
    assert d.added == ()
    assert [list(g.names) for g in d.kept] == [["embed.weight", "lm_head.weight"]]


def test_tie_broken_into_duplicates(tied, broken):
    d = tiecheck.diff(tied, broken)
    assert d.exit_code == 1
    (lost,) = d.lost
    assert list(lost.names) == ["embed.weight", "lm_head.weight"]
    assert lost.broken_into_duplicates
    assert lost.in_b["lm_head.weight"] == NameInB("untied duplicate", with_=("embed.weight",), shape=(64, 16),
                                                  dtype="float32")
    # Without the content pass the copies are merely untied.
    d2 = tiecheck.diff(tied, broken, duplicates=False)
    assert d2.lost[0].in_b["lm_head.weight"].state == "untied"
    assert not d2.lost[0].broken_into_duplicates


def test_retied_is_added_not_lost(tied, broken):
    d = tiecheck.diff(broken, tied)
    assert d.exit_code == 0
    assert d.lost == ()
    assert [list(g.names) for g in d.added] == [["embed.weight", "lm_head.weight"]]


def test_dtype_change_of_a_kept_tie(tied):
    half = TinyLM()
    half.load_state_dict(tied.state_dict())
    half.half()
    d = tiecheck.diff(tied, half)
    assert d.exit_code == 0
    (c,) = d.layout_changed
    assert c.a.dtype == "float32"
    assert c.b.dtype == "float16"


def test_untied_with_different_content_and_grown_groups():
    a = BertLikeMLM()
    b = BertLikeMLM()
    b.decoder.bias = torch.nn.Parameter(torch.randn(50))  # bias tie broken, other content
    b.extra_head = torch.nn.Linear(8, 50)
    b.extra_head.weight = b.word_embeddings.weight  # the weight tie grows a name
    d = tiecheck.diff(a, b)
    assert d.exit_code == 1
    (lost,) = d.lost
    assert list(lost.names) == ["bias", "decoder.bias"]
    assert lost.in_b["decoder.bias"].state == "untied"
    (grown,) = [g for g in d.kept if g.grown]
    assert grown.grown == ("extra_head.weight",)


def test_names_absent_from_b_and_the_hint(tmp_path, tied):
    sd = {k: v.detach().clone() for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    path = write_safetensors(tmp_path / "model.safetensors", sd)
    d = tiecheck.diff(tied, str(path))
    assert d.lost[0].in_b["lm_head.weight"] == NameInB("absent")

    text = render_diff(d)
    assert "Lost ties (1)" in text
    assert "absent" in text
    assert "Hugging Face model folder" in text


def test_cli_table_json_markdown_exit_codes_and_saved_reports(tmp_path, tied, broken):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(tied.state_dict(), a)
    torch.save(broken.state_dict(), b)
    runner = CliRunner()
    res = runner.invoke(main, ["diff", str(a), str(b)])
    assert res.exit_code == 1
    assert "Lost ties (1)" in res.output
    assert "untied duplicate" in res.output
    res = runner.invoke(main, ["diff", str(a), str(a), "--format", "json"])
    assert res.exit_code == 0
    d = json.loads(res.output)
    assert d["summary"]["kept"] == 1
    assert d["summary"]["exit_code"] == 0
    assert d["a"]["target"] == str(a)
    assert runner.invoke(main, ["diff", str(a), str(b), "--format", "markdown"]).output.startswith("# tiecheck diff")

    # A report saved with `inspect --format json` works as either side (a CI baseline).
    snap = tmp_path / "baseline.json"
    assert runner.invoke(main, ["inspect", str(a), "--format", "json", "-o", str(snap)]).exit_code == 0
    assert runner.invoke(main, ["diff", str(snap), str(b)]).exit_code == 1
    assert runner.invoke(main, ["diff", str(snap), str(a)]).exit_code == 0

    out = tmp_path / "diff.json"
    assert runner.invoke(main, ["diff", str(a), str(a), "--format", "json", "-o", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["summary"]["lost"] == 0
    res = runner.invoke(main, ["diff", str(a), str(b), "-o", str(a)])
    assert res.exit_code == 2
    assert "it is the input" in res.output


def test_cli_bad_side_is_one_line_exit_2(tmp_path, tied):
    a = tmp_path / "a.pt"
    torch.save(tied.state_dict(), a)
    res = CliRunner().invoke(main, ["diff", str(a), str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1
    assert res.output.startswith("tiecheck: error:")


def test_tie_turned_into_distinct_parameters_is_a_failure(tied):
    b = TinyLM()
    b.load_state_dict(tied.state_dict())
    # The same memory, but two Parameter objects: gradients are no longer shared.
    b.lm_head.weight = nn.Parameter(b.embed.weight.data)
    d = tiecheck.diff(tied, b)
    assert d.lost == ()
    assert len(d.kept) == 1
    assert d.kind_changed == (KindChange(("embed.weight", "lm_head.weight"), "same_parameter", "distinct_parameters"),)
    assert d.exit_code == 1

    assert "Ties whose kind changed (1)" in render_diff(d)
    # A module's tie and the same tie read from a file are not a change.
    assert tiecheck.diff(tied, tied.state_dict()).kind_changed == ()
