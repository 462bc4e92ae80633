"""The CLI through Click's runner, and once as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from tiecheck.cli import main

from support.models import TinyLM


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def tied_file(tmp_path, tiny_lm):
    p = tmp_path / "tied.pt"
    torch.save(tiny_lm.state_dict(), p)
    return p


@pytest.fixture
def broken_file(tmp_path, untied_copy):
    p = tmp_path / "broken.pt"
    torch.save(untied_copy.state_dict(), p)
    return p


def test_table_output(runner, tied_file):
    res = runner.invoke(main, ["inspect", str(tied_file)])
    assert res.exit_code == 0, res.output
    assert "Tie groups (1)" in res.output
    assert "embed.weight" in res.output
    assert "lm_head.weight" in res.output
    assert "saved by ties" in res.output


@pytest.mark.parametrize("fmt", ["json", "markdown", "csv", "table"])
def test_formats_are_byte_identical_across_runs(runner, tied_file, fmt):
    a = runner.invoke(main, ["inspect", str(tied_file), "--format", fmt])
    b = runner.invoke(main, ["inspect", str(tied_file), "--format", fmt])
    assert a.exit_code == 0
    assert a.output == b.output
    if fmt == "json":
        d = json.loads(a.output)
        assert d["schema_version"] == 2
        assert d["tie_groups"][0]["names"] == ["embed.weight", "lm_head.weight"]
        assert set(d) >= {"source", "summary", "tie_groups", "untied_duplicates", "tie_candidates", "findings"}
    if fmt == "csv":
        header, *rows = a.output.splitlines()
        assert header.startswith("name,shape,dtype")
        assert any(r.startswith("lm_head.weight,64 16,float32") for r in rows)
    if fmt == "markdown":
        assert a.output.startswith("# tiecheck:")
        assert "## Tie groups (1)" in a.output


def test_fail_on_levels(runner, tmp_path):
    # Two embeddings of one shape stored as equal copies: a warning (a shared vocabulary is usually one tensor).
    emb = torch.randn(64, 16)
    path = tmp_path / "copied.pt"
    torch.save({"src_embed.weight": emb, "tgt_embed.weight": emb.clone()}, path)
    assert runner.invoke(main, ["inspect", str(path)]).exit_code == 0  # only a warning
    assert runner.invoke(main, ["inspect", str(path), "--fail-on", "warning"]).exit_code == 1
    assert runner.invoke(main, ["inspect", str(path), "--fail-on", "never"]).exit_code == 0


def test_expect_tied(runner, tied_file, broken_file):
    ok = runner.invoke(main, ["inspect", str(tied_file), "--expect-tied", "embed.weight,lm_head.weight"])
    assert ok.exit_code == 0
    bad = runner.invoke(main, ["inspect", str(broken_file), "--expect-tied", "embed.weight,lm_head.weight",
                               "--fail-on", "never"])
    assert bad.exit_code == 1
    assert "TC009" in bad.output
    usage = runner.invoke(main, ["inspect", str(tied_file), "--expect-tied", "embed.weight"])
    assert usage.exit_code == 2
    assert "at least two" in usage.output


def test_output_file_and_never_over_the_input(runner, tied_file, tmp_path):
    out = tmp_path / "report.json"
    res = runner.invoke(main, ["inspect", str(tied_file), "--format", "json", "-o", str(out)])
    assert res.exit_code == 0
    assert res.stdout == ""
    assert res.stderr == f"tiecheck: wrote {out}\n"
    assert json.loads(out.read_text())["schema_version"] == 2
    before = tied_file.read_bytes()
    res = runner.invoke(main, ["inspect", str(tied_file), "-o", str(tied_file)])
    assert res.exit_code == 2
    assert "refusing to write the output to" in res.output
    assert "it is the input" in res.output
    assert tied_file.read_bytes() == before


def test_no_duplicates_and_optimizer(runner, broken_file):
    res = runner.invoke(main, ["inspect", str(broken_file), "--no-duplicates", "--optimizer", "sgd",
                               "--format", "json"])
    d = json.loads(res.output)
    assert d["content_pass"]["ran"] is False
    assert d["untied_duplicates"] == []
    assert d["summary"]["optimizer"] == "sgd"


def test_trust_pickle_warns(runner, tmp_path):
    p = tmp_path / "full.pt"
    torch.save(TinyLM(), p)
    refused = runner.invoke(main, ["inspect", str(p)])
    assert refused.exit_code == 2
    assert "--trust-pickle" in refused.output
    assert "Traceback" not in refused.output
    ok = runner.invoke(main, ["inspect", str(p), "--trust-pickle"])
    assert ok.exit_code == 0
    assert "warning: --trust-pickle" in ok.output


@pytest.mark.parametrize("target", ["missing.pt", "folder", "empty.pt", "random.bin", "spec.py:boom"])
def test_bad_input_is_one_line_and_exit_2(runner, tmp_path, target):
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.bin").write_bytes(os.urandom(1000))
    (tmp_path / "spec.py").write_text("def boom():\n    raise ValueError('bad config')\n")
    res = runner.invoke(main, ["inspect", str(tmp_path / target)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tiecheck: error: ")
    assert str(tmp_path) in lines[0]
    debug = runner.invoke(main, ["inspect", str(tmp_path / target), "--debug"])
    assert debug.exit_code == 2
    # --debug adds the traceback (ending in the error raised) before the same one-line error.
    assert debug.output.startswith("Traceback (most recent call last):\n")
    assert re.search(r"^tiecheck\.errors\.\w+Error: ", debug.output, re.M)
    assert debug.output.strip().splitlines()[-1] == lines[0]


def test_real_subprocess(tied_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tiecheck.cli", "inspect", str(tied_file), "--format", "json"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tie_groups"][0]["kind"] == "shared_storage"
    bad = subprocess.run([sys.executable, "-m", "tiecheck.cli", "inspect", str(tmp_path / "nope.pt")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr


def test_help_and_models_do_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from tiecheck.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(main, ['models']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_usage_errors_exit_2(runner):
    assert runner.invoke(main, ["inspect"]).exit_code == 2
    assert runner.invoke(main, ["inspect", "x", "--format", "xml"]).exit_code == 2
    assert runner.invoke(main, ["nope"]).exit_code == 2


def test_flops_in_inspect(runner, tmp_path):
    full = json.loads(runner.invoke(main, ["inspect", "gpt-mini", "--format", "json", "--seq-len", "64"]).output)
    f = full["flops"]
    assert f["available"]
    assert f["unit"] == "FLOP"
    assert f["seq_len"] == 64
    assert f["forward"] == sum(f["by_part"].values())
    assert f["by_part"]["embedding"] == 0
    half = json.loads(runner.invoke(main, ["inspect", "gpt-mini", "--format", "json", "--seq-len", "64",
                                           "--causal-attention-half"]).output)["flops"]
    assert half["by_part"]["attention"] * 2 == f["by_part"]["attention"]
    none = json.loads(runner.invoke(main, ["inspect", "gpt-mini", "--format", "json", "--no-flops"]).output)
    assert none["flops"] is None
    assert runner.invoke(main, ["inspect", "gpt-mini", "--seq-len", "0"]).exit_code == 2


def test_flops_with_user_inputs(runner, tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.proj = nn.Linear(8, 4)\n"
        "    def forward(self, x):\n        return self.proj(x)\n"
        "def make_inputs(module, batch_size, seq_len):\n    return (torch.zeros(batch_size, seq_len, 8),)\n")
    res = runner.invoke(main, ["inspect", f"{tmp_path}/net.py:Net", "--inputs", f"{tmp_path}/net.py:make_inputs",
                               "--seq-len", "10", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["flops"]["forward"] == 2 * 10 * 8 * 4


def test_flops_unavailable_for_tensors_only(runner, tied_file):
    d = json.loads(runner.invoke(main, ["inspect", str(tied_file), "--format", "json"]).output)
    assert d["flops"]["available"] is False
    assert "tensors only" in d["flops"]["reason"]


def test_output_never_destroys_inputs_of_any_kind(runner, tmp_path, tiny_lm):
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(tiny_lm.state_dict(), folder / "pytorch_model.bin")
    spec = tmp_path / "net.py"
    spec.write_text("from torch import nn\ndef build():\n    return nn.Linear(2, 2)\n")
    other_weights = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2)}, other_weights)
    cases = [
        ([str(folder), "-o", str(folder / "pytorch_model.bin")], "inside the input folder"),
        ([str(folder), "-o", str(folder / "report.txt")], "inside the input folder"),
        ([f"{spec}:build", "-o", str(spec)], "it is the input"),
        ([f"{spec}:build", "-o", str(other_weights)], "holds model data"),
        ([f"{spec}:build", "--inputs", f"{spec}:build", "-o", str(spec)], "it is the input"),
    ]
    for args, why in cases:
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        res = runner.invoke(main, ["inspect", *args, "--no-flops"])
        assert res.exit_code == 2, (args, res.output)
        assert why in res.output, (args, res.output)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    ok = runner.invoke(main, ["inspect", f"{spec}:build", "--no-flops", "-o", str(tmp_path / "report.txt")])
    assert ok.exit_code == 0
    assert (tmp_path / "report.txt").read_text().startswith("tiecheck:")
