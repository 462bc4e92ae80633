"""Summary figures that mean one thing each: tie savings, nested views, bytes on disk no name reaches."""

from __future__ import annotations

import torch

import tiecheck


def test_flat_buffer_saved_with_its_views_is_not_tie_savings(tmp_path):
    flat = torch.arange(64, dtype=torch.float32)
    sd = {"flat": flat, "a": flat[:32].view(4, 8), "b": flat[32:]}
    path = tmp_path / "flat.pt"
    torch.save(sd, path)
    r = tiecheck.analyze(str(path))
    s = r.summary
    assert r.tie_groups == ()
    assert (s.bytes_saved, s.params_saved, s.bytes_nested_views) == (0, 0, 256)
    assert (s.bytes_counted, s.bytes_unique, s.bytes_unreachable) == (512, 256, 0)
    assert s.training_bytes_saved == 0


def test_tie_savings_are_the_tie_groups(tmp_path):
    emb = torch.randn(16, 4)
    path = tmp_path / "tied.pt"
    torch.save({"emb.weight": emb, "head.weight": emb}, path)
    s = tiecheck.analyze(str(path)).summary
    assert (s.bytes_saved, s.params_saved, s.bytes_nested_views) == (256, 64, 0)
    assert s.training_bytes_saved == 64 * 16


def test_a_view_saved_alone_reports_the_storage_it_drags_to_disk(tmp_path):
    big = torch.randn(64000)
    path = tmp_path / "view.pt"
    torch.save({"w": big[:640]}, path)
    assert path.stat().st_size > 256000  # torch.save writes the whole storage
    r = tiecheck.analyze(str(path))
    assert r.summary.bytes_unreachable == 256000 - 2560
    (f,) = [f for f in r.findings if f.code == "TC021"]
    assert f.severity == "warning"
    assert list(f.names) == ["w"]
    assert "2,560 of the 256,000 bytes" in f.message
    assert ".clone()" in f.hint
    # The fix the hint gives: nothing unreachable, no finding.
    torch.save({"w": big[:640].clone()}, path)
    r = tiecheck.analyze(str(path))
    assert r.summary.bytes_unreachable == 0
    assert "TC021" not in [f.code for f in r.findings]


def test_a_small_slack_is_a_figure_but_no_finding(tmp_path):
    base = torch.randn(100)
    path = tmp_path / "slack.pt"
    torch.save({"w": base[:90]}, path)
    r = tiecheck.analyze(str(path))
    assert r.summary.bytes_unreachable == 40
    assert "TC021" not in [f.code for f in r.findings]
