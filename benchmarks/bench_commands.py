"""Whole commands on a small safetensors file, against ``python -c "import torch"``.

    pytest benchmarks/bench_commands.py --benchmark-only -s

A command that reads a safetensors file or a state dict needs torch and nothing heavier: it never
imports transformers (a test holds that, tests/test_progress.py and the loaders' own). So its
whole-process time is torch's import plus a little; the target is 1.5x ``import torch``
measured in the same run. Each command and the baseline run interleaved, five times each; the
fastest of each is compared (on a shared machine the minimum is the least disturbed run).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROUNDS = 5
TIECHECK = [sys.executable, "-m", "tiecheck.cli"]


def _seconds(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=False)
    return time.perf_counter() - t0


def test_commands_against_import_torch(benchmark, tmp_path: Path, publish):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1024, 64, generator=g)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(),
               **{f"model.layers.{i}.w": torch.randn(64, 64, generator=g) for i in range(8)}}, str(a))
    save_file({"model.embed_tokens.weight": emb, **{f"model.layers.{i}.w": torch.randn(64, 64, generator=g)
                                                    for i in range(8)}}, str(b))
    out = tmp_path / "out.safetensors"
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "tiecheck inspect a.safetensors": [*TIECHECK, "inspect", str(a)],
        "tiecheck diff a.safetensors b.safetensors": [*TIECHECK, "diff", str(a), str(b)],
        "tiecheck fix a.safetensors -o out.safetensors": [*TIECHECK, "fix", str(a), "-o", str(out)],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(ROUNDS):
        for name, argv in commands.items():
            if out.exists():
                out.unlink() if out.is_file() else shutil.rmtree(out)
            times[name].append(_seconds(argv))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    base = min(times["python -c 'import torch'"])
    publish(f"fastest of {ROUNDS}, interleaved: python -c 'import torch' {base:.2f} s")
    for name, ts in list(times.items())[1:]:
        publish(f"  {name}: {min(ts):.2f} s = {min(ts) / base:.2f}x import torch")
