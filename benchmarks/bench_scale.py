"""Every analysis against one plain pass over the same facts, from 10,000 to 200,000 facts.

    pytest benchmarks/bench_scale.py --benchmark-only -s

The suite holds the analyses linear by counting the Python lines they execute
(tests/test_api_scale.py); this measures the seconds. Each step's time is a ratio to one plain pass
that touches every fact and builds a dict entry per fact, measured in the same run (the best of
three of each), so a slow or loaded machine shifts both. A linear step keeps its ratio as the
facts grow; a quadratic one's ratio grows with them (the old overlap sweep: ~120x at 50,000,
~500x at 200,000).
"""

from __future__ import annotations

import time

import pytest

from support.scale import analysis_steps, synthetic_facts

SIZES = [10_000, 50_000, 200_000]


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def linear_pass(facts) -> dict:
    """The reference: every fact's fields read once, one dict entry per fact."""
    return {f.identity: (f.name, f.numel, f.byte_end - f.byte_start) for f in facts}


@pytest.mark.parametrize("n", SIZES)
def test_analyses_against_a_linear_pass(benchmark, publish, n):
    facts = synthetic_facts(n)
    base = best_of(lambda: linear_pass(facts))
    steps = analysis_steps(facts)
    ratios = {name: best_of(step) / base for name, step in steps.items()}
    benchmark.pedantic(lambda: [step() for step in steps.values()], rounds=1, iterations=1)
    worst = max(ratios, key=ratios.get)
    publish(f"{n:,} facts: plain pass {base * 1e3:.1f} ms; every analysis {sum(ratios.values()):.1f}x it in all; "
            f"the most costly, {worst}, {ratios[worst]:.1f}x")
    publish("  " + ", ".join(f"{name} {r:.1f}x" for name, r in ratios.items()))
