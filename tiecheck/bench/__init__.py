"""``tiecheck bench``: tied vs untied throughput and memory, measured so the numbers hold up.

    from tiecheck.bench import BenchConfig, run_bench, render

    result = run_bench(BenchConfig(model="gpt-mini", rounds=6, steps=5))
    result.to_frame()          # one row per (variant, metric), with 95% bootstrap intervals
    result.headline()          # e.g. "step time: no measurable difference (...)"
    print(render(result, "table"))

Modules: ``device`` (every CUDA-specific call), ``protocol`` (a variant's steps and checks),
``runner`` (the interleaved schedule), ``stats`` (medians, bootstrap intervals, ratios),
``flops`` (analytic FLOPs for MFU), ``results`` (the result and its DataFrame), ``render``
and ``plot`` (output).
"""

from __future__ import annotations

from tiecheck.bench.result_text import FORMATS, render
from tiecheck.bench.results import BenchResult
from tiecheck.bench.runner import BenchConfig, run_bench

__all__ = ["FORMATS", "BenchConfig", "BenchResult", "render", "run_bench"]
