"""A snapshot update must not lock in a broken tie without a word (pytest plugin and `tiecheck check`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import tiecheck.api
import tiecheck.pytest_plugin.fixture  # noqa: F401
from tiecheck.cli import main

import support.models as tie_models

pytest_plugins = ["pytester"]

SHARED = """
import support.models as tie_models

def test_tied(tiecheck):
    tiecheck.assert_ties_match_snapshot(tie_models.tied(), "lm")

def test_distinct(tiecheck):
    tiecheck.assert_ties_match_snapshot(tie_models.distinct(), "lm")
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess("-p", "no:hypothesispytest", *args)


@pytest.fixture
def lm(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(tie_models=Path(tie_models.__file__).read_text())
    pytester.makepyfile(test_lm=SHARED)
    return pytester


def test_shared_name_failure_names_the_broken_tie(lm):
    result = run(lm, "--tiecheck-update")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "give each test its own name" not in out
    result.stdout.fnmatch_lines([
        "E*SnapshotErrorsError: not writing the snapshot __tiecheck_snapshots__/test_lm/lm.json: SnapshotLM has 1 error finding:",
        "E*[[]TC002[]] error: head.weight, tok_emb.weight are 2 distinct objects over one memory*",
        "E*fix the model, or record this state anyway: `pytest --tiecheck-update --tiecheck-accept-errors "
        "test_lm.py::test_distinct`"])


def test_per_test_update_refuses_then_records_loudly_with_the_second_flag(lm):
    snap = lm.path / "__tiecheck_snapshots__" / "test_lm" / "lm.json"
    result = run(lm, "--tiecheck-update", "test_lm.py::test_distinct")
    result.assert_outcomes(failed=1)
    assert not snap.exists()
    result = run(lm, "--tiecheck-update", "--tiecheck-accept-errors", "test_lm.py::test_distinct")
    result.assert_outcomes(passed=1)
    assert json.loads(snap.read_text())["tie_groups"][0]["kind"] == "distinct_parameters"
    result.stdout.fnmatch_lines(["tiecheck: 1 snapshot created:", "  __tiecheck_snapshots__/test_lm/lm.json",
                                 "tiecheck: 1 snapshot records error findings (--tiecheck-accept-errors):",
                                 "  __tiecheck_snapshots__/test_lm/lm.json: TC002"])


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(tie_models.__file__, tmp_path / "lm.py")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_update_refuses_a_broken_tie_unless_accepted(project):
    res = CliRunner().invoke(main, ["check", "lm.py:broken", "--expect", "ties.json", "--update"])
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        "tiecheck: error: lm.py:broken: not writing the snapshot ties.json: lm.py:broken has 1 error finding "
        "(TC005 head.weight, tok_emb.weight); fix it, or record this state anyway with --update --accept-errors")
    assert not (project / "ties.json").exists()
    res = CliRunner().invoke(main, ["check", "lm.py:broken", "--expect", "ties.json", "--update", "--accept-errors"])
    assert res.exit_code == 1  # written, and still failing: the broken tie is an error
    assert "snapshot created ties.json (records error findings: TC005)" in res.output
    assert json.loads((project / "ties.json").read_text())["tie_groups"] == []


def test_accept_errors_needs_update(project):
    res = CliRunner().invoke(main, ["check", "lm.py:tied", "--expect", "ties.json", "--accept-errors"])
    assert res.exit_code == 2
    assert "--accept-errors: only with --update" in res.stderr
