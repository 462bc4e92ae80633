"""Cost of the pytest plugin at pytest start-up, against the same start without it.

Run: pytest benchmarks/bench_plugin.py --benchmark-only -s
Target (issue 6): every project with tiecheck installed loads the plugin, so loading it must be
cheap and must not import torch: importing the plugin module under 50 ms (measured alone, in a
fresh interpreter that has pytest), and `pytest --co` of a small suite within 25% of the same run
with `-p no:tiecheck` (whole-process timings are noisy on a shared machine; importing torch would
multiply the time, not add a few percent).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from conftest import run_child

SUITE = "def test_one():\n    pass\n"


def test_plugin_import(benchmark, publish):
    res = benchmark.pedantic(lambda: run_child("import tiecheck.pytest_plugin.plugin\n_out['torch'] = 'torch' in "
                                               "__import__('sys').modules", setup="import pytest"),
                             rounds=5, iterations=1)
    publish(f"\nimporting the plugin module after pytest: {res['wall_s'] * 1e3:.1f} ms, torch imported: {res['torch']}")
    assert not res["torch"]
    assert res["wall_s"] < 0.050


def test_pytest_start_with_and_without_plugin(benchmark, tmp_path, publish):
    (tmp_path / "test_one.py").write_text(SUITE)
    base = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", str(tmp_path)]

    def timed(extra: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(base + extra, check=True, capture_output=True)
        return time.perf_counter() - t0

    with_plugin, without = [], []
    for _ in range(7):  # interleaved, so drift on a busy machine hits both alike
        with_plugin.append(timed([]))
        without.append(timed(["-p", "no:tiecheck"]))
    benchmark.pedantic(lambda: timed([]), rounds=3, iterations=1)
    a, b = statistics.median(with_plugin), statistics.median(without)
    benchmark.extra_info.update(with_plugin_s=a, without_plugin_s=b)
    publish(f"\npytest --co, 1 test: with the plugin {a:.3f} s, without {b:.3f} s (ratio {a / b:.3f}, "
            f"difference {(a - b) * 1e3:+.0f} ms)")
    assert a / b < 1.25
