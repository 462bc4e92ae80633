"""Ignored findings (``ignore`` in [tool.tiecheck], ``--ignore``): kept in the report, marked, never failing;
and diff's hint for a head trained apart (TC005's hint with a config that unties is in test_loaders_verdicts)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main
from tiecheck.errors import TiecheckError

import support.models as tm

EMB, HEAD = "tok_emb.weight", "head.weight"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project whose model has a broken tie (TC005, an error) beside its tied twin."""
    shutil.copy(tm.__file__, tmp_path / "lm.py")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_an_ignored_finding_stays_in_the_report_and_never_fails():
    r = tiecheck.analyze(tm.broken(), ignore=["TC005"])
    (f,) = [f for f in r.findings if f.code == "TC005"]
    assert f.severity == "error"
    assert f.ignored is True
    assert f.ignored_by == "TC005"
    assert r.exit_code("warning") == 0
    assert r.failing_findings("warning") == []
    assert r.summary.findings.error == 0
    assert r.summary.findings_ignored == 1
    assert tiecheck.analyze(tm.broken()).exit_code() == 1  # not ignored: it fails


def test_a_glob_ignores_the_findings_that_name_a_matching_tensor():
    assert tiecheck.analyze(tm.broken(), ignore=["TC005:head.*"]).exit_code() == 0
    r = tiecheck.analyze(tm.broken(), ignore=["TC005:*.rotary_emb.*"])  # matches no name here
    assert not any(f.ignored for f in r.findings)
    assert r.exit_code() == 1


@pytest.mark.parametrize("spec", ["TC05", "TC999", "XX005", "TC005:"])
def test_a_bad_spec_is_one_line_that_says_what_to_write(spec):
    with pytest.raises(TiecheckError, match="ignore: "):
        tiecheck.analyze(tm.tied(), ignore=[spec])
    res = CliRunner().invoke(main, ["inspect", "gpt-mini", "--no-flops", "--ignore", spec])
    assert res.exit_code == 2
    assert "--ignore" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_inspect_ignore_keeps_the_finding_in_json_and_exits_zero(project):
    res = CliRunner().invoke(main, ["inspect", "lm.py:broken", "--no-flops", "--format", "json",
                                    "--ignore", "TC005"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    (f,) = [f for f in d["findings"] if f["code"] == "TC005"]
    assert f["ignored"] is True
    assert f["severity"] == "error"
    table = CliRunner().invoke(main, ["inspect", "lm.py:broken", "--no-flops", "--ignore", "TC005"]).output
    assert "Findings (0, 1 ignored)" in table
    assert "ignored TC005 (error, by TC005) " in table


def test_check_reads_ignore_globally_and_per_target(project):
    (project / "pyproject.toml").write_text(
        '[tool.tiecheck]\nfail-on = "warning"\nignore = ["TC006"]\n\n'
        '[[tool.tiecheck.targets]]\ntarget = "lm.py:broken"\nignore = ["TC005:head.weight"]\n\n'
        '[[tool.tiecheck.targets]]\ntarget = "lm.py:untied"\n')
    res = CliRunner().invoke(main, ["check", "--format", "json"])
    assert res.exit_code == 0, res.output
    targets = {t["target"]: t for t in json.loads(res.stdout)["targets"]}
    assert targets["lm.py:broken"]["status"] == "ok"
    assert targets["lm.py:untied"]["status"] == "ok"
    # Without the per-target entry the broken tie fails again; the global list still covers TC006.
    (project / "pyproject.toml").write_text('[tool.tiecheck]\nfail-on = "warning"\nignore = ["TC006"]\n\n'
                                            '[[tool.tiecheck.targets]]\ntarget = "lm.py:broken"\n')
    res = CliRunner().invoke(main, ["check"])
    assert res.exit_code == 1
    assert "TC005" in res.output
    assert CliRunner().invoke(main, ["check", "--ignore", "TC005"]).exit_code == 0


def test_a_bad_ignore_in_the_policy_is_an_input_error(project):
    (project / "pyproject.toml").write_text('[tool.tiecheck]\nignore = ["TC05"]\n\n'
                                            '[[tool.tiecheck.targets]]\ntarget = "lm.py:tied"\n')
    res = CliRunner().invoke(main, ["check"])
    assert res.exit_code == 2
    assert "ignore: 'TC05': TC05 is not a rule code" in res.stderr


# -- hints that follow the verdict ------------------------------------------------------------------

def test_diff_does_not_say_re_tie_for_a_head_trained_apart(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(tm.tied().state_dict(), a)
    trained = tm.untied()  # the head holds its own values now
    torch.save(trained.state_dict(), b)
    res = CliRunner().invoke(main, ["diff", str(a), str(b)])
    assert res.exit_code == 1
    assert "re-tie" not in res.output
    assert f"hint: B holds {HEAD}, {EMB} with different content: decide which copy is right" in res.output
