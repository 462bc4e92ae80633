"""The code the benchmarks time runs against today's API.

The benchmarks under benchmarks/ time code they hand a child interpreter as strings (``SETUP``, then
``INSPECT``/``ANALYZE``); the suite does not run them, so a change of the Report's shape (its typed model
once broke every one of them) would go unseen until someone measured. Each string is read from its
file as written, without importing the benchmark, and run here on a tiny target of the kind it measures;
it must fill its ``_out`` without an error.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# The child's helper that the timed code may call (benchmarks/conftest.py's run_child defines it).
PRELUDE = "def _rchar():\n    return 0\n"


def snippet(file: str, name: str) -> str:
    """A module-level string constant of a benchmark, as its source assigns it."""
    for node in ast.parse((BENCHMARKS / file).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{file} assigns no {name}")


def run(file: str, code: str = "INSPECT", **fmt: str) -> dict:
    out: dict = {}
    scope = {"_out": out}
    # the benchmark's own code, read from the repository
    exec(PRELUDE + snippet(file, "SETUP"), scope)
    exec(snippet(file, code).format(**fmt), scope)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small safetensors file: an embedding, its head stored as a copy, and its head's transpose."""
    path = tmp_path_factory.mktemp("snippets") / "model.safetensors"
    emb = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    save_file({"embed.weight": emb, "head.weight": emb.clone(), "proj.weight": emb.t().contiguous()}, str(path))
    return path


@pytest.mark.parametrize(("file", "keys"), [("bench_inspect.py", {"groups", "bytes_read", "dups"}),
                                            ("bench_transposed.py", {"copies", "bytes_read", "full"}),
                                            ("bench_formats.py", {"read", "tensors", "params", "groups"})])
def test_inspect_snippets_run_on_a_file(file, keys, weights):
    assert set(run(file, path=str(weights))) == keys


def test_the_inspect_snippet_reads_what_it_reports(weights):
    out = run("bench_inspect.py", path=str(weights))
    assert out["dups"] == [["embed.weight", "head.weight"]]
    out = run("bench_transposed.py", path=str(weights))
    (pair,) = out["copies"]
    assert pair[0] == "proj.weight"
    assert pair[1] in ("embed.weight", "head.weight")


def test_the_remote_snippet_runs_on_a_local_target(weights):
    out = run("bench_remote.py", target=str(weights))
    assert out["tensors"] == 3
    assert out["duplicates"] == 1


def test_the_hf_snippet_runs_on_a_folder(tmp_path):
    pytest.importorskip("transformers")
    from support.hf import tiny_llama  # noqa: PLC0415 - transformers only for this test

    tiny_llama(tie=True).save_pretrained(str(tmp_path))
    assert run("bench_hf_moe.py", "ANALYZE", path=str(tmp_path)) == {"unexpected": 0}


def test_the_onnx_snippet_runs_on_an_export(tmp_path):
    pytest.importorskip("onnx")
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64, bias=False))
    model[1].weight = model[0].weight
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model.eval(), (torch.zeros(1, 4, dtype=torch.long),), str(path), dynamo=False)
    out = run("bench_onnx.py", path=str(path))
    assert "pairs" in out


def test_the_precision_sweep_runs_one_class(tmp_path):
    """benchmarks/sweep_precision.py reads reports through the API too: one small class, swept whole."""
    pytest.importorskip("transformers")
    out = tmp_path / "sweep.jsonl"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "sweep_precision.py"), "--only", "GPT2LMHeadModel",
                           "--out", str(out), "--summary-out", str(tmp_path / "summary.txt")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["status"] == "built", row.get("reason")
    assert row["flops"]["available"]
    assert all(v["status"] == "ok" for v in row["variants"] if v["status"] != "same")
