"""``check_target`` called as a library function: what one target's Outcome holds (failing findings,
warnings below fail-on, the error that stopped it) and the defaults a caller that passes only the
target and ``update`` gets."""

from __future__ import annotations

import pytest
import torch

import tiecheck.check.outcome as outcome
from tiecheck.check.outcome import Outcome, check_target
from tiecheck.check.policy import TargetPolicy

from support.checkpoints import write_safetensors


def _target(path, **more) -> TargetPolicy:
    return TargetPolicy(target=str(path), resolved=str(path), **more)


def _equal_embeddings(tmp_path):
    """Two equal embeddings of one vocabulary: TC005 as a warning (usually one tensor, not a broken tie)."""
    torch.manual_seed(0)
    w = torch.randn(16, 4)
    return write_safetensors(tmp_path / "embeddings.safetensors", {"encoder.embed_tokens.weight": w,
                                                                  "decoder.embed_tokens.weight": w.clone()})


def _broken_tie(tmp_path):
    """An embedding and its head stored as two equal copies: TC005 as an error."""
    torch.manual_seed(0)
    emb = torch.randn(16, 4)
    return write_safetensors(tmp_path / "broken.safetensors", {"tok_emb.weight": emb, "head.weight": emb.clone()})


def test_a_warning_below_fail_on_is_shown_and_does_not_fail(tmp_path):
    out = check_target(_target(_equal_embeddings(tmp_path)), update=False)
    assert out.status == "ok"
    assert out.failing == []
    assert [(f.code, f.severity, f.names) for f in out.warnings] == [("TC005", "warning",
                                                                      ("decoder.embed_tokens.weight",
                                                                       "encoder.embed_tokens.weight"))]
    assert [w["code"] for w in out.to_dict()["warnings"]] == ["TC005"]


def test_a_warning_at_fail_on_fails_and_is_no_longer_a_warning(tmp_path):
    out = check_target(_target(_equal_embeddings(tmp_path), fail_on="warning"), update=False)
    assert out.status == "failed"
    assert [f.code for f in out.failing] == ["TC005"]
    assert out.warnings == []


def test_a_target_that_cannot_be_read_counts_no_tie_groups(tmp_path):
    out = check_target(_target(tmp_path / "missing.safetensors"), update=False)
    assert out.status == "error"
    assert out.error.startswith(str(tmp_path / "missing.safetensors"))
    assert out.groups == 0
    assert out.to_dict()["tie_groups"] == 0
    assert Outcome(target="t").groups == 0


def test_an_unforeseen_error_is_the_targets_error_unless_debugging(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(kwargs.get("key") or "boom\nsecond line")

    monkeypatch.setattr(outcome, "analyze", broken)
    target = _target(_equal_embeddings(tmp_path))
    out = check_target(target, update=False)
    assert out.error == f"{target.target}: unexpected RuntimeError: boom (rerun with --debug for the traceback)"
    with pytest.raises(RuntimeError, match="boom"):
        check_target(target, update=False, debug=True)
    # One line of it, at most 300 characters.
    long = check_target(_target(target.target, key="x" * 400), update=False)
    assert long.error == f"{target.target}: unexpected RuntimeError: {'x' * 300} (rerun with --debug for the traceback)"


def test_an_update_refuses_a_broken_tie_unless_errors_are_accepted(tmp_path):
    snapshot = tmp_path / "ties.json"
    target = _target(_broken_tie(tmp_path), expect=snapshot)
    out = check_target(target, update=True)
    assert out.error.startswith(f"{target.target}: not writing the snapshot ")
    assert f"{target.target} has 1 error finding (TC005" in out.error
    assert "(TC005 head.weight, tok_emb.weight); fix it, or record this state anyway with --update --accept-errors" \
        in out.error
    assert not snapshot.exists()
    out = check_target(target, update=True, accept_errors=True)
    assert (out.error, out.snapshot_status, out.snapshot_errors) == (None, "created", ["TC005"])
    assert snapshot.exists()


def test_a_finding_failing_by_the_policys_fail_on_points_at_the_policy(tmp_path):
    # GitHub annotations point a finding at the file whose rule fails it: a warning fails only
    # because the policy's fail-on says so; an error fails whatever it says.
    target = _target(_equal_embeddings(tmp_path), fail_on="warning")
    out = check_target(target, update=False, fail_on_origin="pyproject.toml")
    (failing,) = out.failing
    assert out.origins == {failing.message: "pyproject.toml"}
    assert check_target(target, update=False).origins == {}
    broken = check_target(_target(_broken_tie(tmp_path), fail_on="warning"), update=False,
                          fail_on_origin="pyproject.toml")
    assert [f.severity for f in broken.failing] == ["error"]
    assert broken.origins == {}


def test_a_path_on_another_drive_is_shown_whole(monkeypatch):
    # Windows: relpath raises ValueError across drives; the path is then shown as given.
    def other_drive(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(outcome.os.path, "relpath", other_drive)
    assert outcome.shown("D:/models/ties.json") == "D:/models/ties.json"


def test_an_ignored_warning_is_not_shown(tmp_path):
    out = check_target(_target(_equal_embeddings(tmp_path), ignore=("TC005",)), update=False)
    assert (out.status, out.failing, out.warnings) == ("ok", [], [])


def test_an_update_counts_each_broken_tie(tmp_path):
    torch.manual_seed(1)
    a, b = torch.randn(16, 4), torch.randn(32, 4)
    path = write_safetensors(tmp_path / "two.safetensors", {"tok_emb.weight": a, "head.weight": a.clone(),
                                                            "wte.weight": b, "lm_head.weight": b.clone()})
    out = check_target(_target(path, expect=tmp_path / "ties.json"), update=True)
    assert f"{path} has 2 error findings (TC005 " in out.error
