"""tiecheck.testing: the assertions, called directly (no fixture), on small real models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiecheck
from tiecheck.errors import TiecheckError
from tiecheck.testing import (
    BrokenTieError,
    FindingsError,
    NotTiedError,
    SnapshotErrorsError,
    SnapshotMismatchError,
    SnapshotMissingError,
    TieAssertionError,
    UnexpectedTieError,
    UnknownNameError,
    assert_no_broken_ties,
    assert_no_findings,
    assert_not_tied,
    assert_tied,
    assert_ties_match_snapshot,
    match_snapshot,
)

import support.models as tm
from support.models import EMB, HEAD

RETIE = "model.tie_weights() or assign the Parameter again (model.head.weight = model.tok_emb.weight)"


# -- assert_tied / assert_not_tied -------------------------------------------------------------

def test_tied_model_passes_tie_assertions():
    model = tm.tied()
    assert_tied(model, EMB, HEAD)
    assert_tied(model, HEAD)  # one name: tied to something
    assert_not_tied(model, "norms.0.weight", "norms.1.weight")
    assert_not_tied(model, "norms.0.weight")  # one name: tied to nothing


def test_assign_true_untie_fails_with_cause_and_fix():
    with pytest.raises(NotTiedError) as exc:
        assert_tied(tm.broken(), EMB, HEAD)
    msg = str(exc.value)
    assert isinstance(exc.value, AssertionError)
    assert msg.startswith(f"expected {EMB}, {HEAD} to be tied in SnapshotLM, but they are not")
    # What each name shares memory with now, and that the values are still equal.
    assert f"{EMB} shares memory with nothing (equal values to {HEAD} in separate memory)" in msg
    assert "re-tie after load_state_dict(assign=True)" in msg
    assert RETIE in msg
    assert [f.code for f in exc.value.findings] == ["TC009"]


def test_never_tied_names_get_the_build_time_hint():
    with pytest.raises(NotTiedError, match="their values differ: they were never tied here") as exc:
        assert_tied(tm.untied(), EMB, HEAD)
    assert "Tie them where the model is built (model.head.weight = model.tok_emb.weight)" in str(exc.value)


def test_single_name_not_tied_names_its_copy():
    with pytest.raises(NotTiedError, match=f"expected {HEAD} to be tied to another name in SnapshotLM") as exc:
        assert_tied(tm.broken(), HEAD)
    assert f"equal values to {EMB} in separate memory" in str(exc.value)


def test_distinct_parameters_over_one_memory_are_not_a_tie():
    with pytest.raises(NotTiedError) as exc:
        assert_tied(tm.distinct(), EMB, HEAD)
    msg = str(exc.value)
    assert "[TC002]" in msg
    assert "gradients are not shared" in msg
    assert "assigning the Parameter itself" in msg


def test_not_tied_fails_when_names_share_memory():
    with pytest.raises(UnexpectedTieError) as exc:
        assert_not_tied(tm.tied(), EMB, HEAD)
    msg = str(exc.value)
    assert msg.startswith(f"expected {EMB}, {HEAD} not to be tied in SnapshotLM, but they share memory")
    assert f"{EMB} shares memory with {HEAD} (same_parameter)" in msg
    with pytest.raises(UnexpectedTieError, match="but it shares memory"):
        assert_not_tied(tm.tied(), HEAD)
    assert_not_tied(tm.broken(), EMB, HEAD)


def test_unknown_name_fails_instead_of_passing_vacuously():
    with pytest.raises(UnknownNameError, match=r"tok_emb\.wieght is not in the target \(did you mean tok_emb\.weight\?\)"):
        assert_not_tied(tm.tied(), "tok_emb.wieght", HEAD)
    with pytest.raises(UnknownNameError):
        assert_tied(tm.tied(), "lm_head.weight", EMB)


def test_names_are_required_and_are_strings():
    with pytest.raises(TypeError, match="needs at least one tensor name"):
        assert_tied(tm.tied())
    with pytest.raises(TypeError, match="separate strings"):
        assert_tied(tm.tied(), [EMB, HEAD])


def test_accepts_state_dict_report_file_and_spec(tmp_path):
    model = tm.tied()
    assert_tied(model.state_dict(), EMB, HEAD)  # a state dict keeps both names over one storage
    assert_tied(tiecheck.analyze(model), EMB, HEAD)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "step": 3}, path)
    assert_tied(str(path), EMB, HEAD)
    assert_tied(path, EMB, HEAD)
    assert_tied(f"{Path(tm.__file__)}:tied", EMB, HEAD)
    with pytest.raises(NotTiedError):
        assert_tied(tm.broken().state_dict(), EMB, HEAD)


def test_bad_target_is_an_input_error_not_an_assertion(tmp_path):
    (tmp_path / "empty.pt").touch()
    with pytest.raises(TiecheckError, match=r"empty\.pt: the file is empty"):
        assert_tied(str(tmp_path / "empty.pt"), EMB, HEAD)


# -- assert_no_broken_ties / assert_no_findings ------------------------------------------------

def test_no_broken_ties_ignores_constant_groups():
    assert_no_broken_ties(tm.tied())  # the LayerNorms are equal (all ones) but constant
    assert_no_broken_ties(tm.untied())  # untied with different values: nothing broken


def test_broken_ties_reported_with_fix():
    with pytest.raises(BrokenTieError) as exc:
        assert_no_broken_ties(tm.broken())
    msg = str(exc.value)
    assert msg.startswith("1 broken tie in SnapshotLM:")
    assert f"[TC005] error: {HEAD}, {EMB} hold equal float32 [64, 16] content in separate memory" in msg
    assert RETIE in msg
    with pytest.raises(BrokenTieError, match=r"\[TC002\]"):
        assert_no_broken_ties(tm.distinct())


def test_broken_ties_needs_weights():
    with pytest.raises(TiecheckError, match="cannot look for broken ties: no tensor data"):
        assert_no_broken_ties(tm.on_meta())


def test_no_findings_by_severity_and_ignore():
    assert_no_findings(tm.tied(), "info")
    assert_no_findings(tm.untied(), "warning")  # only TC006 (info)
    with pytest.raises(FindingsError, match=r"1 finding at info or worse in SnapshotLM:\n  \[TC006\] info:"):
        assert_no_findings(tm.untied(), "info")
    assert_no_findings(tm.untied(), "info", ignore=["TC006"])
    with pytest.raises(FindingsError) as exc:
        assert_no_findings(tm.broken())
    assert [f.code for f in exc.value.findings] == ["TC005"]
    assert "hint: Re-tie after loading" in str(exc.value)
    assert "Here: model.head.weight = model.tok_emb.weight" in str(exc.value)
    with pytest.raises(ValueError, match="severity must be one of"):
        assert_no_findings(tm.tied(), "fatal")


# -- snapshots -----------------------------------------------------------------------------------

def test_snapshot_missing_then_created_then_matched(tmp_path):
    path = tmp_path / "ties" / "lm.json"
    with pytest.raises(SnapshotMissingError, match="update=True"):
        assert_ties_match_snapshot(tm.tied(), path)
    assert not path.exists()
    assert match_snapshot(tm.tied(), path, update=True) == "created"
    data = json.loads(path.read_text())
    assert data["tie_groups"] == [{"names": [HEAD, EMB], "kind": "same_parameter"}]
    assert set(data) == {"tiecheck_snapshot", "tiecheck_version", "tie_groups"}  # names and kinds, no weights
    assert_ties_match_snapshot(tm.tied(), path)
    assert_ties_match_snapshot(tm.tied().state_dict(), path)  # shared_storage matches same_parameter
    before = path.read_bytes()
    assert match_snapshot(tm.tied(), path, update=True) == "unchanged"
    assert path.read_bytes() == before


def test_snapshot_mismatch_shows_expected_actual_and_hint(tmp_path):
    path = tmp_path / "lm.json"
    assert_ties_match_snapshot(tm.tied(), path, update=True)
    with pytest.raises(SnapshotMismatchError) as exc:
        assert_ties_match_snapshot(tm.broken(), path)
    msg = str(exc.value)
    assert f"tie groups of SnapshotLM differ from the snapshot {path}" in msg
    assert f"  expected:\n    [same_parameter] {HEAD}, {EMB}\n  actual:\n    (no tie groups)\n" in msg
    assert "[TC009]" in msg
    assert RETIE in msg
    assert "update=True" in msg
    with pytest.raises(SnapshotErrorsError, match=r"not writing the snapshot .*: SnapshotLM has 1 error finding"):
        match_snapshot(tm.broken(), path, update=True)  # a broken tie is no state to record unasked
    assert match_snapshot(tm.broken(), path, update=True, accept_errors=True) == "updated"
    assert json.loads(path.read_text())["tie_groups"] == []
    assert_ties_match_snapshot(tm.broken(), path)


def test_snapshot_new_tie_and_changed_kind(tmp_path):
    path = tmp_path / "lm.json"
    assert_ties_match_snapshot(tm.untied(), path, update=True)
    with pytest.raises(SnapshotMismatchError, match=r"\[TC013\] error: head\.weight, tok_emb\.weight share memory "
                                                    r"\(same_parameter\), which .* does not expect"):
        assert_ties_match_snapshot(tm.tied(), path)
    assert_ties_match_snapshot(tm.tied(), path, update=True)
    with pytest.raises(SnapshotMismatchError, match=r"\[TC014\] error: head\.weight, tok_emb\.weight are tied as "
                                                    r"distinct_parameters, expected same_parameter") as exc:
        assert_ties_match_snapshot(tm.distinct(), path)
    assert "gradients are not shared" in str(exc.value)


def test_inspect_json_is_a_snapshot(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(tiecheck.analyze(tm.tied()).to_json())
    assert_ties_match_snapshot(tm.tied(), path)
    with pytest.raises(SnapshotMismatchError):
        assert_ties_match_snapshot(tm.broken(), path)


@pytest.mark.parametrize(("text", "why"), [
    ("{not json", "not valid JSON (line 1"),
    ("[]", "expected a JSON object with a 'tie_groups' list, found a list"),
    ('{"groups": []}', "no 'tie_groups' list"),
    ('{"tie_groups": [{"names": ["a"]}]}', "two or more tensor names"),
    ('{"tie_groups": [{"names": ["a", "b"], "kind": "glued"}]}', "unknown kind 'glued'"),
    ('{"tie_groups": [{"names": ["a", "b"]}, {"names": ["b", "c"]}]}', "b is listed in tie_groups[0] and tie_groups[1]"),
    ('{"tiecheck_snapshot": 9, "tie_groups": []}', "tiecheck_snapshot 9 is not supported"),
])
def test_bad_snapshot_is_an_input_error(tmp_path, text, why):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TiecheckError) as exc:
        assert_ties_match_snapshot(tm.tied(), path)
    assert str(exc.value).startswith(str(path))
    assert why in str(exc.value)
    assert not isinstance(exc.value, AssertionError)
    assert path.read_text() == text  # never rewritten outside update mode


def test_update_replaces_an_unreadable_snapshot(tmp_path):
    path = tmp_path / "lm.json"
    path.write_text("{oops")
    assert match_snapshot(tm.tied(), path, update=True) == "updated"
    assert_ties_match_snapshot(tm.tied(), path)


def test_update_never_writes_over_the_target(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tm.tied().state_dict(), path)
    before = path.read_bytes()
    with pytest.raises(TiecheckError, match=r"refusing to write the snapshot to .*: it is the input"):
        assert_ties_match_snapshot(str(path), path, update=True)
    assert path.read_bytes() == before


def test_errors_are_assertion_errors():
    for cls in (NotTiedError, UnexpectedTieError, UnknownNameError, BrokenTieError, FindingsError,
                SnapshotMismatchError, SnapshotMissingError):
        assert issubclass(cls, TieAssertionError)
        assert issubclass(cls, AssertionError)


def test_assertions_work_without_pytest():
    code = (
        "import sys; sys.modules['pytest'] = None\n"  # any import of pytest now fails
        "sys.path.insert(0, sys.argv[1])\n"
        "import support.models as tm\n"
        "from tiecheck.testing import assert_tied, NotTiedError\n"
        "assert_tied(tm.tied(), 'tok_emb.weight', 'head.weight')\n"
        "try:\n    assert_tied(tm.broken(), 'tok_emb.weight', 'head.weight')\n"
        "except NotTiedError as e:\n    print('caught', str(e).splitlines()[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(tm.__file__).parent.parent)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "caught expected tok_emb.weight, head.weight to be tied in SnapshotLM, but they are not"
