"""Peak memory of `tiecheck bench` (the default CPU run) against a plain loop doing the same steps.

Run: pytest benchmarks/bench_bench_memory.py --benchmark-only -s
Target (issue: bench memory climbs): the bench's peak RSS within 1.2x the loop's, both measured
in the same run. Each is a whole process, started from a small Python wrapper that reads its
peak (``RUSAGE_CHILDREN``'s ``ru_maxrss``: Linux carries a high-water mark across fork and exec,
so the parent must be small, not this pytest process). The bench ran at 0.68-1.67 GB before the
fix, from one run to the next, so it is run three times and the largest peak is the figure.

The loop is what the bench does, without the bench: both gpt-mini variants built from one seed,
fused AdamW on each, the same four batches of 4 x 64 tokens, one thread, 2 warm-up steps each,
then 24 rounds of 3 steps per variant, alternating A B | B A as the bench's rounds do.
"""

from __future__ import annotations

import subprocess
import sys
import time

WRAPPER = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
LOOP = """
import torch
from tiecheck import models
from tiecheck.bench import device as D
from tiecheck.bench.protocol import make_batches
torch.set_num_threads(1)
cpu = torch.device("cpu")
cfg = models.get_config("gpt-mini")
batches = make_batches(cfg.kind, cfg.vocab_size, 4, 64, 4, 0, cpu)
pairs = []
for tied in (True, False):
    model = models.build("gpt-mini", tied=tied, device=cpu, seed=0)
    pairs.append([model, D.make_adamw(model.parameters(), cpu, 3e-4, 0.1)[0], 0])

def step(i):
    model, opt, n = pairs[i]
    b = batches[n % len(batches)]
    pairs[i][2] += 1
    model(*b.inputs, targets=b.targets).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

for i in (0, 1):
    for _ in range(2):
        step(i)
for r in range(24):
    for i in ((0, 1) if r % 2 == 0 else (1, 0)):
        for _ in range(3):
            step(i)
assert [p[2] for p in pairs] == [74, 74]  # what the default bench steps per variant: 2 + 24 x 3
"""


def peak_mib(argv: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time (s) of the process ``argv``."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024, time.perf_counter() - t0


def test_bench_peak_vs_a_plain_loop(benchmark, tmp_path, publish):
    out = tmp_path / "bench.txt"
    bench_cmd = [sys.executable, "-m", "tiecheck", "bench", "-o", str(out)]
    loop_cmd = [sys.executable, "-c", LOOP]
    loops = [peak_mib(loop_cmd)]
    benches = []
    benchmark.pedantic(lambda: benches.append(peak_mib(bench_cmd)), rounds=3, iterations=1)
    loops.append(peak_mib(loop_cmd))
    loop, bench = max(p for p, _ in loops), max(p for p, _ in benches)
    ratio = bench / loop
    benchmark.extra_info.update(bench_rss_mib=[round(p) for p, _ in benches], loop_rss_mib=[round(p) for p, _ in loops],
                                ratio=ratio)
    publish(f"\nplain loop, both variants alternating: peak {', '.join(f'{p:.0f}' for p, _ in loops)} MiB "
            f"({', '.join(f'{s:.1f}' for _, s in loops)} s) | tiecheck bench (default CPU run): peak "
            f"{', '.join(f'{p:.0f}' for p, _ in benches)} MiB ({', '.join(f'{s:.1f}' for _, s in benches)} s) | "
            f"ratio {ratio:.2f}x (largest against largest)")
    report = out.read_text()
    assert "pass  tied still tied after 74 steps" in report
    assert "pass  untied losses finite" in report
    assert ratio <= 1.2
