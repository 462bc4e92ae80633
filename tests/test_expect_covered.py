"""An unmet expectation and the content pass on the same names: one finding, the expectation's.

``--expect-tied A,B`` on copies of equal values gave TC009 ("expected A, B to be tied: ... equal values in
separate memory") and beside it TC005 on the same pair, whose verdict -- "nothing ties or relates these
names, so this is no broken tie" where no role relates them -- contradicted the user's own statement.
"""

from __future__ import annotations

import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main


def _save(path, **tensors):
    torch.save(tensors, path)
    return str(path)


def codes(report) -> list[tuple[str, tuple[str, ...]]]:
    return [(f.code, f.names) for f in report.findings if f.code in ("TC005", "TC009")]


def test_an_expectation_on_unrelated_copies_is_reported_once(tmp_path):
    e = torch.randn(64, 16)
    target = _save(tmp_path / "copies.pt", **{"a.weight": e, "b.weight": e.clone()})
    assert codes(tiecheck.analyze(target)) == [("TC005", ("a.weight", "b.weight"))]  # info: nothing relates them
    report = tiecheck.analyze(target, expect_tied=[("a.weight", "b.weight")])
    assert codes(report) == [("TC009", ("a.weight", "b.weight"))]
    assert "equal values to b.weight in separate memory" in report.findings_of("TC009")[0].message


def test_a_broken_embedding_tie_with_an_expectation_is_reported_once(tmp_path):
    e = torch.randn(1000, 16)
    target = _save(tmp_path / "llama.pt", **{"model.embed_tokens.weight": e, "lm_head.weight": e.clone()})
    pair = ("lm_head.weight", "model.embed_tokens.weight")
    assert [(f.code, f.severity) for f in tiecheck.analyze(target).findings if f.code == "TC005"] == [("TC005", "error")]
    report = tiecheck.analyze(target, expect_tied=[pair])
    assert [c for c, _ in codes(report)] == ["TC009"]
    result = CliRunner().invoke(main, ["check", target, "--expect-tied", ",".join(pair)])
    assert result.exit_code == 1
    assert "TC009" in result.output
    assert "TC005" not in result.output


def test_a_copy_the_expectation_does_not_name_stays(tmp_path):
    e = torch.randn(64, 16)
    target = _save(tmp_path / "three.pt", **{"a.weight": e, "b.weight": e.clone(), "c.weight": e.clone()})
    report = tiecheck.analyze(target, expect_tied=[("a.weight", "b.weight")])
    assert sorted(c for c, _ in codes(report)) == ["TC005", "TC009"]
    assert ("TC005", ("a.weight", "b.weight", "c.weight")) in codes(report)
