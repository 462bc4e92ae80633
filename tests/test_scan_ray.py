"""``tiecheck scan --engine ray``: the same per-target function as Ray tasks, on a local Ray cluster
(``ray.init(num_cpus=2)``), gives the same rows as the process pool; a task whose worker dies is an
error row.

Starting a Ray cluster takes seconds, so these tests are kept out of the default run
(``pytest -m ray`` runs them; CI does).
"""

from __future__ import annotations

import csv
import io

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from tiecheck.cli import main
from tiecheck.scan import ScanOptions, run_pool, run_ray

from support.checkpoints import tiny_state_dict
from support.hf import EMB, HEAD

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

CRASH = "import os, signal\n\ndef segfault():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-fleet")
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(32, 8, generator=g)
    save_file({EMB: emb, HEAD: emb.clone()}, str(root / "broken.safetensors"))
    save_file({EMB: emb, HEAD: torch.randn(32, 8, generator=g)}, str(root / "untied.safetensors"))
    torch.save(tiny_state_dict(), root / "tied.pt")
    (root / "bad.safetensors").write_bytes((100).to_bytes(8, "little") + b'{"a": 1')
    (root / "crash.py").write_text(CRASH)
    return [str(root / n) for n in ("broken.safetensors", "untied.safetensors", "tied.pt", "bad.safetensors")] + \
        [f"{root / 'crash.py'}:segfault"]


def _without_time(rows) -> dict[str, dict]:
    return {r["target"]: {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def test_ray_and_the_pool_give_the_same_rows(cluster, targets):
    by_ray = _without_time(run_ray(targets, ScanOptions(), jobs=2, address=None))
    by_pool = _without_time(run_pool(targets, ScanOptions(), jobs=2))
    crashed = targets[-1]
    assert by_ray[crashed]["error"].startswith("the Ray worker died while reading this target")
    assert by_pool[crashed]["error"].startswith("the worker process died while reading this target")
    del by_ray[crashed], by_pool[crashed]
    assert by_ray == by_pool
    assert {r["verdict"] for r in by_ray.values()} == {"broken", "untied", "tied", ""}


def test_the_cli_on_ray(cluster, targets, tmp_path):
    out = tmp_path / "rows.csv"
    res = CliRunner().invoke(main, ["scan", "--from", str(_listed(tmp_path, targets[:3])), "--engine", "ray",
                                    "-o", str(out)])
    assert res.exit_code == 1, res.output  # the broken tie
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert sorted(r["target"] for r in rows) == sorted(targets[:3])
    assert res.output.startswith("scan: 3 checkpoints")


def _listed(folder, targets):
    path = folder / "targets.txt"
    path.write_text("\n".join(targets) + "\n")
    return path
