"""``tiecheck scan`` over 10,000 small local checkpoints: against a plain walk and header read, with
``--jobs``, and on a local Ray cluster of 2 workers against the process pool.

Run: pytest benchmarks/bench_scan.py --benchmark-only -s
The checkpoints are generated: 100 folders of 100 safetensors files, each an embedding and a
head (32 x 16 float32), a tenth of them a head stored as a copy of the embedding (a broken tie).
Every figure is the wall time of a fresh ``tiecheck scan`` process (``subprocess``), imports and
worker start included, on the same files in the same run. Baseline: a plain ``os.walk`` reading
each file's 8-byte length and JSON header (``json.loads``), in a fresh interpreter too — what any
scan must at least do, without the analysis. Ray: ``--engine ray --jobs 2`` starts a local
cluster of 2 CPUs; its wall is shown with the cluster's start, and without it (the same targets
as Ray tasks, timed after ``ray.init``).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_child
from safetensors.torch import save_file

FOLDERS, PER_FOLDER = 100, 100
WALK = """
import json, os
_n = 0
for _dir, _dirs, _files in os.walk({root!r}):
    _dirs.sort()
    for _f in sorted(_files):
        with open(os.path.join(_dir, _f), "rb") as _fh:
            _len = int.from_bytes(_fh.read(8), "little")
            json.loads(_fh.read(_len))
        _n += 1
_out["files"] = _n
"""
RAY_SETUP = ("import ray, tiecheck.scan\n"
             "ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)\n"
             "_targets = list(tiecheck.scan.discover(__import__('pathlib').Path({root!r})))\n"
             "list(tiecheck.scan.run_ray(_targets[:4], tiecheck.scan.ScanOptions(), jobs=2, address=None))\n")
RAY_RUN = ("_rows = list(tiecheck.scan.run_ray(_targets, tiecheck.scan.ScanOptions(), jobs=2, address=None))\n"
           "_out['rows'] = len(_rows); _out['broken'] = sum(r['verdict'] == 'broken' for r in _rows)")


@pytest.fixture(scope="session")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet10k")
    g = torch.Generator().manual_seed(0)
    for f in range(FOLDERS):
        folder = root / f"run-{f:03d}"
        folder.mkdir()
        for i in range(PER_FOLDER):
            emb = torch.randn(32, 16, generator=g)
            head = emb.clone() if i % 10 == 0 else torch.randn(32, 16, generator=g)
            save_file({"model.embed_tokens.weight": emb, "lm_head.weight": head}, str(folder / f"step-{i:03d}.safetensors"))
    return root


def _scan(root, out, *args: str) -> tuple[float, list[dict]]:
    """Wall seconds of a fresh ``tiecheck scan`` process, and the rows it wrote."""
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tiecheck", "scan", str(root), "-o", str(out), *args],
                          capture_output=True, text=True, env={**os.environ, "CI": "true"})
    wall = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr  # the planted broken ties
    with open(out, newline="") as fh:
        return wall, list(csv.DictReader(fh))


def test_scan_10k(benchmark, fleet, tmp_path, publish):
    n = FOLDERS * PER_FOLDER
    walk = run_child(WALK.format(root=str(fleet)))
    assert walk["files"] == n
    out = tmp_path / "rows.csv"
    walls: dict[str, float] = {}
    for jobs in (1, 2, 4):
        walls[f"jobs {jobs}"], rows = _scan(fleet, out, "--jobs", str(jobs))
        assert len(rows) == n
        assert sum(r["verdict"] == "broken" for r in rows) == n // 10
    walls["ray 2"], rows = benchmark.pedantic(lambda: _scan(fleet, out, "--engine", "ray", "--jobs", "2"), rounds=1,
                                              iterations=1)
    assert len(rows) == n
    assert sum(r["verdict"] == "broken" for r in rows) == n // 10
    ray_tasks = run_child(RAY_RUN, setup=RAY_SETUP.format(root=str(fleet)))
    assert ray_tasks["rows"] == n
    assert ray_tasks["broken"] == n // 10
    benchmark.extra_info.update(walk_s=walk["wall_s"], **{k.replace(" ", "_"): v for k, v in walls.items()},
                                ray_tasks_s=ray_tasks["wall_s"])
    base = walk["wall_s"]
    publish(f"\n{n:,} safetensors files in {FOLDERS} folders ({n // 10:,} broken ties) | os.walk + header read "
            f"{base:.2f} s ({base / n * 1e6:.0f} us a file)")
    for name, wall in walls.items():
        engine = "--engine ray --jobs 2 (local cluster start included)" if name.startswith("ray") else f"--{name}"
        publish(f"tiecheck scan {engine}: {wall:.1f} s, {n / wall:,.0f} checkpoints/s, {wall / base:.0f}x the walk, "
                f"{walls['jobs 1'] / wall:.2f}x --jobs 1")
    publish(f"Ray tasks alone (2 workers, after ray.init): {ray_tasks['wall_s']:.1f} s, "
            f"{n / ray_tasks['wall_s']:,.0f} checkpoints/s, {ray_tasks['wall_s'] / walls['jobs 2']:.2f}x the pool's "
            f"whole --jobs 2 run")
