"""One output shape: top-level `files` for every target, integer tie groups in CSV and pandas, and
Python errors from run_bench() named as Python names them."""

from __future__ import annotations

import inspect as pyinspect
import json

import pytest
import torch
from click.testing import CliRunner

from tiecheck import analyze
from tiecheck.bench import BenchConfig, run_bench
from tiecheck.cli import main
from tiecheck.errors import TiecheckError
from tiecheck.report import SCHEMA_VERSION

import support.models as tm


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    folder = tmp_path_factory.mktemp("hf") / "gpt"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def test_files_are_top_level_for_a_folder_as_for_a_file(hf_folder):
    res = CliRunner().invoke(main, ["inspect", str(hf_folder), "--no-flops", "--format", "json"])
    report = json.loads(res.output)
    assert report["schema_version"] == SCHEMA_VERSION == 2
    assert [f["file"] for f in report["files"]] == ["model.safetensors"]
    assert "files" not in report["hf"]
    res = CliRunner().invoke(main, ["inspect", str(hf_folder / "model.safetensors"), "--no-flops", "--format", "json"])
    assert [f["file"] for f in json.loads(res.output)["files"]] == ["model.safetensors"]


def test_the_output_embedding_of_a_tied_gpt2_is_the_head(hf_folder):
    res = CliRunner().invoke(main, ["inspect", str(hf_folder), "--no-flops", "--format", "json"])
    arch = json.loads(res.output)["hf"]["architecture"]
    assert (arch["input_embedding"], arch["output_embedding"]) == ("transformer.wte.weight", "lm_head.weight")


def test_csv_and_frame_keep_tie_groups_integer(tmp_path):
    path = tmp_path / "tied.pt"
    torch.save(tm.tied().state_dict(), path)
    res = CliRunner().invoke(main, ["inspect", str(path), "--format", "csv"])
    rows = {r.split(",")[0]: r.split(",") for r in res.output.splitlines()[1:]}
    header = res.output.splitlines()[0].split(",")
    col = header.index("tie_group")
    assert rows["head.weight"][col] == "0"
    assert rows["norms.0.weight"][col] == ""
    frame = analyze(path).to_frame()
    assert str(frame["tie_group"].dtype) == "Int64"
    assert frame.set_index("name").loc["tok_emb.weight", "tie_group"] == 0


def test_analyze_skips_flops_by_default_and_says_why():
    assert pyinspect.signature(analyze).parameters["flops"].default is False
    assert "Off by default here because it traces the model" in " ".join(analyze.__doc__.split())


def test_run_bench_names_options_as_python_does():
    with pytest.raises(TiecheckError, match=r"^BenchConfig\(warmup=1\): training needs at least 2 warm-up steps"):
        run_bench(BenchConfig(model="gpt-mini", warmup=1))
    with pytest.raises(TiecheckError, match=r"^BenchConfig\(seq_len=0\): must be a positive integer"):
        run_bench(BenchConfig(seq_len=0))
