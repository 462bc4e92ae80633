"""Cost linear in tensor count: every analysis on synthetic facts, counted in Python lines executed.

A memory-mapped checkpoint is one storage holding every tensor, so anything that rescans or
copies that storage's list per tensor is quadratic there (find_overlaps was: 100,000 tensors
took minutes). Each analysis here runs on 2,000 and on 10,000 facts under a line counter: the
count is exact and the same on any machine, whatever its load, and five times the facts must
cost five times the lines, not twenty-five. Seconds are measured by the benchmark
(benchmarks/bench_scale.py), never asserted here. The analyses are also run at 50,000 facts
(200,000 with TIECHECK_SLOW=1) to check that they compute the right thing at that size.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tiecheck.analyses.duplicates import ContentPass
from tiecheck.analyses.memory import memory_summary
from tiecheck.analyses.ties import find_tie_groups, group_by_identity, tie_findings
from tiecheck.facts import Source, TensorFact
from tiecheck.report.render import render
from tiecheck.report.report import Report
from tiecheck.report.rows import TensorRows

from support.scale import analysis_steps, synthetic_facts

# 50,000 facts in the default run; 200,000 with TIECHECK_SLOW=1, kept out of the default run for time.
SIZES = [50_000, pytest.param(200_000, marks=pytest.mark.skipif(not os.environ.get("TIECHECK_SLOW"),
                                                                reason="set TIECHECK_SLOW=1 for 200,000 facts"))]
# Five times the facts: a linear step executes 5x the lines (plus a constant), an n log n merge in
# Python about 6x, a quadratic one 25x.
GROWTH = 5.5


def lines_executed(fn) -> int:
    """How many Python lines ``fn()`` executes, in its own code and every function it calls."""
    count = 0

    def in_frame(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return in_frame

    sys.settrace(lambda frame, event, arg: in_frame)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.fixture(scope="module", params=SIZES)
def facts(request) -> list[TensorFact]:
    return synthetic_facts(request.param)


def test_every_analysis_is_linear_in_tensor_count():
    small, large = analysis_steps(synthetic_facts(2_000)), analysis_steps(synthetic_facts(10_000))
    growth = {name: lines_executed(large[name]) / lines_executed(small[name]) for name in large}
    steep = {name: round(g, 2) for name, g in growth.items() if g > GROWTH}
    assert steep == {}, f"steps executing more than {GROWTH}x the lines for 5x the facts: {steep}"
    assert all(g >= 4.5 for g in growth.values()), growth  # the counter saw each step's per-fact work


def test_every_analysis_is_right_at_scale(facts):
    n = len(facts) - 3
    results = {name: step() for name, step in analysis_steps(facts).items()}
    by_identity = group_by_identity(facts)
    groups = find_tie_groups(facts, by_identity)

    # And they computed the right thing at that size.
    (g,) = results["find_tie_groups"]
    assert g.names == ("alias.weight", "lm_head.weight", "model.layers.0.experts.0.w")
    (o,) = results["find_overlaps"]
    assert (o.a, o.b, o.kind) == (("model.layers.0.experts.1.w",), ("view",), "nested")
    summary = results["memory_summary"]
    assert summary.bytes_unique == n * 64
    assert summary.bytes_counted == n * 64 + 2 * 64 + 16
    dups, stats = results["find_untied_duplicates"]
    assert dups == []
    assert stats.tensors == n + 1
    assert len(results["tensor_rows"]) == n + 3
    assert [f.code for f in tie_findings(groups, results["find_overlaps"])] == ["TC007"]


def test_report_renders_at_scale_without_listing_every_tensor(facts):
    by_identity = group_by_identity(facts)
    groups = find_tie_groups(facts, by_identity)
    report = Report(source=Source("synthetic", "safetensors"), summary=memory_summary(facts, groups, "adamw", by_identity),
                    tie_groups=tuple(groups), tensors=TensorRows.of(facts, groups),
                    content=ContentPass(ran=False, reason="synthetic"))
    n = len(facts) - 3
    text = report.to_json()
    back = json.loads(text)
    assert back == json.loads(json.dumps(report.to_dict()))  # the one-row-per-line layout is the same JSON
    assert text.count("\n") < n + 200  # one line per tensor row, not one per field
    table = render(report, "table")
    assert len(table.splitlines()) < 60  # groups and findings, never a line per tensor
    assert "model.layers.0.experts.0.w" in table
    assert "experts.7.w" not in table
