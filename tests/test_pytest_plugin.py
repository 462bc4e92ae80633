"""The pytest plugin, run by pytest's own ``pytester`` (in-process: torch is imported once)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import tiecheck.api
import tiecheck.pytest_plugin.fixture  # noqa: F401
from tiecheck import __version__

import support.models as tie_models

pytest_plugins = ["pytester"]

SNAPSHOT = Path("__tiecheck_snapshots__") / "test_lm" / "lm.json"


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An in-process run. Hypothesis's plugin is left out: pytester drops modules an inner run
    imports, so each run would import (and assertion-rewrite) hypothesis again, for seconds."""
    return pytester.runpytest_inprocess("-p", "no:hypothesispytest", *args)


@pytest.fixture
def lm(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester folder holding the small models as an importable module."""
    pytester.makepyfile(tie_models=Path(tie_models.__file__).read_text())
    return pytester


def snapshot_test(model: str) -> str:
    return f"""
import support.models as tie_models

def test_lm(tiecheck):
    tiecheck.assert_ties_match_snapshot(tie_models.{model}(), "lm")
"""


def test_registered_through_the_pytest11_entry_point():
    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "tiecheck"]
    assert ep.value == "tiecheck.pytest_plugin.plugin"


def test_plugin_does_not_import_torch_at_startup(tmp_path):
    # Every project with tiecheck installed loads the plugin: collecting must not pay for torch.
    (tmp_path / "test_plain.py").write_text("def test_nothing():\n    pass\n")
    code = (
        "import sys, pytest\n"
        "class Probe:\n"
        "    def pytest_collection_finish(self, session):\n"
        "        print('tiecheck loaded:', session.config.pluginmanager.has_plugin('tiecheck'))\n"
        "        print('torch imported:', 'torch' in sys.modules)\n"
        "pytest.main(['--co', '-q', '-p', 'no:cacheprovider', sys.argv[1]], plugins=[Probe()])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "tiecheck loaded: True" in out.stdout, out.stdout + out.stderr
    assert "torch imported: False" in out.stdout


def test_header_and_options(pytester: pytest.Pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = run(pytester)
    result.stdout.fnmatch_lines([f"tiecheck: {__version__} (snapshots beside each test file; --tiecheck-update writes them)"])
    result = run(pytester, "--tiecheck-update", "--tiecheck-snapshot-dir", "snaps")
    result.stdout.fnmatch_lines([f"tiecheck: {__version__} (snapshots in snaps; --tiecheck-update: writing them)"])
    result = run(pytester, "--help")
    result.stdout.fnmatch_lines(["tiecheck: weight-tie assertions and snapshots:", "*--tiecheck-update*",
                                 "*--tiecheck-snapshot-dir=DIR*", "*tiecheck_snapshot_dir*"])


def test_passing_assertions(lm: pytest.Pytester):
    lm.makepyfile(test_pass="""
import support.models as tie_models
from support.models import EMB, HEAD

def test_tied(tiecheck):
    model = tie_models.tied()
    tiecheck.assert_tied(model, EMB, HEAD)
    tiecheck.assert_not_tied(model, "norms.0.weight", "norms.1.weight")
    tiecheck.assert_no_broken_ties(model)
    tiecheck.assert_no_findings(model, "info")
    assert not tiecheck.update
    assert tiecheck.snapshot_path("lm").relative_to(tiecheck.snapshot_path().parent.parent.parent).as_posix() == \
        "__tiecheck_snapshots__/test_pass/lm.json"
    assert tiecheck.snapshot_path().name == "test_tied.json"

def test_state_dict_and_report(tiecheck):
    tiecheck.assert_tied(tie_models.tied().state_dict(), EMB, HEAD)
    report = tiecheck.analyze(tie_models.tied())
    tiecheck.assert_tied(report, EMB, HEAD)
    tiecheck.assert_no_findings(report, "warning")
""")
    run(lm).assert_outcomes(passed=2)


def test_failing_assertions_and_their_messages(lm: pytest.Pytester):
    lm.makepyfile(test_fail="""
import support.models as tie_models
from support.models import EMB, HEAD

def test_tied(tiecheck):
    tiecheck.assert_tied(tie_models.broken(), EMB, HEAD)

def test_not_tied(tiecheck):
    tiecheck.assert_not_tied(tie_models.tied(), EMB, HEAD)

def test_broken(tiecheck):
    tiecheck.assert_no_broken_ties(tie_models.broken())

def test_findings(tiecheck):
    tiecheck.assert_no_findings(tie_models.distinct(), "error")
""")
    result = run(lm)
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines([
        "E*NotTiedError: expected tok_emb.weight, head.weight to be tied in SnapshotLM, but they are not",
        "E*  now:",
        "E*    tok_emb.weight shares memory with nothing (equal values to head.weight in separate memory)",
        "E*    head.weight shares memory with nothing (equal values to tok_emb.weight in separate memory)",
        "E*  hint: they hold equal values in separate memory*re-tie after load_state_dict(assign=True)*"
        "model.tie_weights() or assign the Parameter again (model.head.weight = model.tok_emb.weight)",
    ])
    result.stdout.fnmatch_lines([
        "E*UnexpectedTieError: expected tok_emb.weight, head.weight not to be tied in SnapshotLM, but they share memory",
        "E*    tok_emb.weight shares memory with head.weight (same_parameter)",
    ])
    result.stdout.fnmatch_lines(["E*BrokenTieError: 1 broken tie in SnapshotLM:",
                                 "E*[[]TC005[]] error: head.weight, tok_emb.weight hold equal float32 [[]64, 16[]]*"])
    result.stdout.fnmatch_lines(["E*FindingsError: 1 finding at error or worse in SnapshotLM:",
                                 "E*[[]TC002[]] error: head.weight, tok_emb.weight are 2 distinct objects over one memory*"])
    # The failure points at the test's line, not into tiecheck.
    assert "tiecheck/testing.py" not in result.stdout.str()


def test_missing_snapshot_says_how_to_create_it(lm: pytest.Pytester):
    lm.makepyfile(test_lm=snapshot_test("tied"))
    result = run(lm)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"E*SnapshotMissingError: no tie snapshot at {SNAPSHOT}: run "
                                 f"`pytest --tiecheck-update test_lm.py::test_lm` to write it, then commit the file"])
    assert not (lm.path / SNAPSHOT).exists()


def test_update_creates_then_compares(lm: pytest.Pytester):
    lm.makepyfile(test_lm=snapshot_test("tied"))
    result = run(lm, "--tiecheck-update")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["tiecheck: 1 snapshot created:", f"  {SNAPSHOT}"])
    data = json.loads((lm.path / SNAPSHOT).read_text())
    assert data == {"tiecheck_snapshot": 1, "tiecheck_version": __version__,
                    "tie_groups": [{"names": ["head.weight", "tok_emb.weight"], "kind": "same_parameter"}]}
    run(lm).assert_outcomes(passed=1)
    before = (lm.path / SNAPSHOT).read_bytes()
    result = run(lm, "--tiecheck-update")
    result.stdout.fnmatch_lines(["tiecheck: 1 snapshot unchanged"])
    assert (lm.path / SNAPSHOT).read_bytes() == before


def test_mismatch_then_update(lm: pytest.Pytester):
    lm.makepyfile(test_lm=snapshot_test("tied"))
    run(lm, "--tiecheck-update").assert_outcomes(passed=1)
    lm.makepyfile(test_lm=snapshot_test("broken"))  # the model now unties on load
    result = run(lm)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"E*SnapshotMismatchError: tie groups of SnapshotLM differ from the snapshot {SNAPSHOT}",
        "E*  expected:",
        "E*    [[]same_parameter[]] head.weight, tok_emb.weight",
        "E*  actual:",
        "E*    (no tie groups)",
        "E*  differences:",
        "E*    [[]TC009[]] error: expected head.weight, tok_emb.weight to be tied*",
        "E*      hint: they hold equal values in separate memory*",
        "E*  if the change is intended, refresh the snapshot: `pytest --tiecheck-update test_lm.py::test_lm`",
    ])
    # A broken tie is no state to record (see test_snapshot_errors.py); untying on purpose is.
    lm.makepyfile(test_lm=snapshot_test("untied"))
    result = run(lm, "--tiecheck-update")
    result.assert_outcomes(passed=1)
    # What the update changed is shown under the file, as snapshot libraries show it.
    result.stdout.fnmatch_lines(["tiecheck: 1 snapshot updated:", f"  {SNAPSHOT}",
                                 "    removes tie group head.weight = tok_emb.weight (same_parameter)"])
    assert json.loads((lm.path / SNAPSHOT).read_text())["tie_groups"] == []
    run(lm).assert_outcomes(passed=1)


def test_default_names_and_snapshot_dir(lm: pytest.Pytester):
    lm.makepyfile(test_names="""
import pytest, tie_models

@pytest.mark.parametrize("make", ["tied", "untied"])
def test_model(tiecheck, make):
    model = getattr(tie_models, make)()
    tiecheck.assert_ties_match_snapshot(model)
    tiecheck.assert_ties_match_snapshot(model)
""")
    run(lm, "--tiecheck-update", "--tiecheck-snapshot-dir", "snaps").assert_outcomes(passed=2)
    written = sorted(p.relative_to(lm.path).as_posix() for p in lm.path.rglob("*.json"))
    assert written == ["snaps/test_names/test_model-tied-2.json", "snaps/test_names/test_model-tied.json",
                       "snaps/test_names/test_model-untied-2.json", "snaps/test_names/test_model-untied.json"]
    assert json.loads((lm.path / "snaps/test_names/test_model-untied.json").read_text())["tie_groups"] == []
    # The ini option is the same folder; without it, nothing is found beside the test file.
    lm.makeini("[pytest]\ntiecheck_snapshot_dir = snaps\n")
    run(lm).assert_outcomes(passed=2)
    lm.makeini("[pytest]\n")
    run(lm).assert_outcomes(failed=2)


def test_two_tests_writing_different_ties_to_one_snapshot(lm: pytest.Pytester):
    lm.makepyfile(test_lm="""
import support.models as tie_models

def test_a(tiecheck):
    tiecheck.assert_ties_match_snapshot(tie_models.tied(), "lm")

def test_b(tiecheck):
    tiecheck.assert_ties_match_snapshot(tie_models.untied(), "lm")
""")
    result = run(lm, "--tiecheck-update")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"E*test_lm.py::test_b and test_lm.py::test_a write different ties to one snapshot "
                                 f"{SNAPSHOT} in this run: give each test its own name*"])
    assert json.loads((lm.path / SNAPSHOT).read_text())["tie_groups"]  # test_a's snapshot kept


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_snapshot_names_are_plain_file_names(lm: pytest.Pytester, name):
    lm.makepyfile(test_lm=f"""
import support.models as tie_models

def test_lm(tiecheck):
    tiecheck.assert_ties_match_snapshot(tie_models.tied(), {name!r})
""")
    result = run(lm, "--tiecheck-update")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E*ValueError: snapshot name * is not usable as a file name*"])
    assert not list(lm.path.rglob("*.json"))


def test_plugin_can_be_disabled(pytester: pytest.Pytester):
    pytester.makepyfile("def test_uses(tiecheck):\n    pass\n")
    result = run(pytester, "-p", "no:tiecheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'tiecheck' not found*"])
    assert "tiecheck: " + __version__ not in result.stdout.str()
