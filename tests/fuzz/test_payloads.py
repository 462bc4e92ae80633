"""Round 3 of hostile files: each payload of ``payloads.py`` through ``tiecheck inspect``, in the
fuzz harness's long-lived worker process.

Every payload must end in exit 2 with one clear line (matching what it breaks), or in a correct
report; within 256 MiB of peak RSS over the benign file of its format, measured by the worker for
each case (VmHWM reset per case); and, like every fuzz case, on a read-only copy left unchanged, with
nothing printed past click. A hang is caught by the case's timeout (generous: the time figures are
printed with ``-s`` and recorded in docs/security.md, never asserted). Payloads are written in a
fraction of a second each; the 200,000-initializer ONNX model runs with TIECHECK_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gguf")
pytest.importorskip("peft")

from payloads import BENIGN, SLOW, Table, payloads

from harness import PEAK_GROWTH_MB, Worker, run_case

TIMEOUT_S = 120  # a hang, not a slow case: the slowest payload takes about 15 s on a loaded two-core machine
CASES = payloads() + (SLOW if os.environ.get("TIECHECK_SLOW_TESTS") else [])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The worker, warmed with every benign file, and each format's benign peak growth."""
    base = tmp_path_factory.mktemp("payloads")
    targets = {}
    for fmt, write in BENIGN.items():
        d = base / "benign" / fmt.replace(" ", "_")
        d.mkdir(parents=True)
        targets[fmt] = (d, write(d))
    worker = Worker(base / "worker", warmup=[["inspect", str(d / t), "--no-flops"] for d, t in targets.values()])
    benign = {}
    for fmt, (d, target) in targets.items():
        res, found = run_case(worker, d, target, f"benign {fmt}", ("--format", "json"), timeout=TIMEOUT_S)
        assert not found, (fmt, found, res.stderr)
        assert res.exit_code == 0, (fmt, found, res.stderr)
        benign[fmt] = res.peak_growth_mb
    figures: list[str] = []
    yield base, worker, benign, figures
    worker.stop()
    print("\npayload | exit | seconds | peak growth MiB (benign of its format)")
    print("\n".join(figures))


@pytest.mark.parametrize(("fmt", "name", "write", "expected"), CASES, ids=[c[1] for c in CASES])
def test_payload_is_refused_in_one_line_or_reported_within_bounds(bench, fmt, name, write, expected):
    base, worker, benign, figures = bench
    d = base / "case"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    target = write(d)
    args = () if isinstance(expected, Table) else ("--format", "json")
    res, found = run_case(worker, d, target, name, args, timeout=TIMEOUT_S)
    figures.append(f"{name} | {res.exit_code} | {res.elapsed:.1f} | {res.peak_growth_mb:.0f} ({benign[fmt]:.0f})")
    assert not found, "\n".join(found)
    assert res.peak_growth_mb <= benign[fmt] + PEAK_GROWTH_MB, (res.peak_growth_mb, benign[fmt])
    if isinstance(expected, Table):
        assert res.exit_code in (0, 1), res.stderr
        assert expected in res.stdout, res.stderr
    elif isinstance(expected, str):
        assert res.exit_code == 2, res.stdout[:500]
        assert re.search(expected, res.stderr), res.stderr
    else:
        assert res.exit_code in (0, 1), res.stderr
        assert expected(json.loads(res.stdout)), res.stdout[:2000]
