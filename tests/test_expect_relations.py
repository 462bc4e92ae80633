"""An unmet expectation relates the names it expects tied: equal copies of them are a broken tie.

``--expect-tied A,B`` on copies of equal values gave TC009 ("expected A, B to be tied: ... equal values in
separate memory") and beside it an info TC005 on the same pair whose verdict -- "nothing ties or relates
these names, so this is no broken tie" -- contradicted the user's own statement. The expectation is a
relation like a declaration: the TC005 says it, as an error.
"""

from __future__ import annotations

import torch

import tiecheck


def _save(path, **tensors) -> str:
    torch.save(tensors, path)
    return str(path)


def tc005(report) -> list[tuple[str, tuple[str, ...], str]]:
    return [(f.severity, f.names, f.message.rsplit("; ", 1)[1]) for f in report.findings_of("TC005")]


def test_an_expectation_makes_copies_nothing_else_relates_a_broken_tie(tmp_path):
    e = torch.randn(64, 16)
    target = _save(tmp_path / "copies.pt", **{"a.weight": e, "b.weight": e.clone()})
    pair = ("a.weight", "b.weight")
    assert tc005(tiecheck.analyze(target)) == [
        ("info", pair, "nothing ties or relates these names, so this is no broken tie")]
    report = tiecheck.analyze(target, expect_tied=[pair])
    assert tc005(report) == [("error", pair, "an expectation names them tied (a.weight, b.weight), so this is a "
                                             "broken tie")]
    assert "model.b.weight = model.a.weight" in report.findings_of("TC005")[0].hint
    (missing,) = report.findings_of("TC009")
    assert "equal values to b.weight in separate memory" in missing.message


def test_a_generator_of_expectations_is_read_for_both_findings(tmp_path):
    e = torch.randn(64, 16)
    target = _save(tmp_path / "copies.pt", **{"a.weight": e, "b.weight": e.clone()})
    report = tiecheck.analyze(target, expect_tied=(g for g in [("a.weight", "b.weight")]))
    assert [f.code for f in report.findings if f.severity == "error"] == ["TC005", "TC009"]


def test_copies_the_expectation_does_not_name_keep_their_own_verdict(tmp_path):
    e, f = torch.randn(64, 16), torch.randn(32, 8)
    target = _save(tmp_path / "two.pt", **{"a.weight": e, "b.weight": e.clone(), "x.weight": f, "y.weight": f.clone()})
    report = tiecheck.analyze(target, expect_tied=[("a.weight", "b.weight")])
    assert [(s, names) for s, names, _ in tc005(report)] == [("error", ("a.weight", "b.weight")),
                                                            ("info", ("x.weight", "y.weight"))]
