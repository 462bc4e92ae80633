"""``tiecheck scan``: every checkpoint of a tree (or a list) as one row, on worker processes.

The tree below holds a checkpoint of every verdict (a broken tie, a head stored twice, a tie, no
tie), a broken file, a Hugging Face folder, a sharded index and a Hugging Face cache; each test
checks rows against what ``tiecheck.analyze`` says of the same target. Worker crashes are made by
Python specs that kill their own process (a spec is the user's code, run in the worker), and an
interrupted scan by SIGINT to a real ``tiecheck scan`` process.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import tiecheck
from tiecheck.cli import main
from tiecheck.scan import ROW_FIELDS, discover, scan_target
from tiecheck.scan.row import report_row

from support.checkpoints import tiny_state_dict, write_sharded
from support.hf import EMB, HEAD, tiny_llama
from support.servers import FileServer, hf_cache

CRASH = """
import os, signal
import torch

def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)

def model():
    return torch.nn.Linear(4, 4)
"""

SLOW = """
import time
import torch

def model():
    time.sleep(0.4)
    return torch.nn.Linear(4, 4)
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A folder tree of checkpoints, one of each kind a scan meets."""
    root = tmp_path_factory.mktemp("fleet")
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 16, generator=g)
    (root / "runs" / "a").mkdir(parents=True)
    save_file({EMB: emb, HEAD: emb.clone()}, str(root / "runs" / "a" / "broken.safetensors"))
    save_file({EMB: emb, HEAD: torch.randn(64, 16, generator=g)}, str(root / "runs" / "a" / "untied.safetensors"))
    torch.save(tiny_state_dict(), root / "runs" / "tied.pt")
    (root / "runs" / "bad.safetensors").write_bytes((100).to_bytes(8, "little") + b'{"a": 1')
    (root / "runs" / "notes.txt").write_text("not a checkpoint")
    write_sharded(root / "sharded", {f"w{i}": torch.randn(8, 8, generator=g) for i in range(4)})
    model = tiny_llama(tie=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.config.tie_word_embeddings = True
    model.save_pretrained(root / "hf" / "twice")
    tiny_llama(tie=True).save_pretrained(root / "hf-src")
    hf_cache(root / "cache", "org/tiny", root / "hf-src", "c" * 40)
    (root / "hf-src" / "config.json").rename(root / "hf-src.json")  # hf-src is now a loose safetensors file
    (root / ".hidden").mkdir()
    save_file({"x": torch.zeros(2)}, str(root / ".hidden" / "skip.safetensors"))
    return root


def expected_targets(root: Path) -> list[str]:
    return [str(root / p) for p in (
        "cache/models--org--tiny/snapshots/" + "c" * 40, "hf-src/model.safetensors", "hf/twice",
        "runs/a/broken.safetensors", "runs/a/untied.safetensors", "runs/bad.safetensors", "runs/tied.pt",
        "sharded/model.safetensors.index.json")]


def test_discovery_finds_one_target_per_checkpoint(tree):
    assert sorted(discover(tree)) == expected_targets(tree)


def _rows(text: str) -> dict[str, dict]:
    return {r["target"]: r for r in csv.DictReader(io.StringIO(text))}


def test_a_scan_gives_the_row_of_every_checkpoint(tree, tmp_path):
    out = tmp_path / "rows.csv"
    res = CliRunner().invoke(main, ["scan", str(tree), "-o", str(out), "--jobs", "2"])
    assert res.exit_code == 1, res.output  # broken ties and an unreadable file
    rows = _rows(out.read_text())
    assert sorted(rows) == expected_targets(tree)
    verdicts = {Path(t).relative_to(tree).as_posix(): r["verdict"] for t, r in rows.items()}
    assert verdicts["runs/a/broken.safetensors"] == "broken"
    assert verdicts["runs/a/untied.safetensors"] == "untied"
    assert verdicts["runs/tied.pt"] == "tied"
    assert verdicts["hf/twice"] == "stored twice"
    assert verdicts["runs/bad.safetensors"] == ""
    assert "header length 100 bytes exceeds the file size" in rows[str(tree / "runs/bad.safetensors")]["error"]
    twice = rows[str(tree / "hf" / "twice")]
    assert int(twice["bytes_stored_twice"]) == 64 * 16 * 4
    assert "TC016" in twice["findings"]
    # Each row is what the analysis says of its target, the one per-target function run in a worker.
    for target in (str(tree / "runs/a/broken.safetensors"), str(tree / "hf" / "twice")):
        local = report_row(target, tiecheck.analyze(target), 0.0)
        assert {k: str(v) for k, v in local.items() if k != "seconds"} == \
            {k: v for k, v in rows[target].items() if k != "seconds"}
    assert res.output.strip() == (f"scan: 8 checkpoints, 8.00 KiB stored twice (in 2), 1 broken tie (in 1), "
                                  f"1 unreadable; rows in {out}")
    never = CliRunner().invoke(main, ["scan", str(tree / "sharded"), "--fail-on", "never", "--jobs", "1"])
    assert never.exit_code == 0
    assert never.stdout.splitlines()[0] == ",".join(ROW_FIELDS)


def test_rows_as_json_lines_and_parquet(tree, tmp_path):
    root = tree / "runs"
    jsonl, parquet = tmp_path / "rows.jsonl", tmp_path / "rows.parquet"
    for out in (jsonl, parquet):
        res = CliRunner().invoke(main, ["scan", str(root), "-o", str(out), "--jobs", "1", "--no-duplicates"])
        assert res.exit_code == 1, res.output
    by_json = {r["target"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    frame = pd.read_parquet(parquet)
    assert list(frame.columns) == list(ROW_FIELDS)
    assert sorted(frame["target"]) == sorted(by_json)
    for r in frame.to_dict("records"):
        assert {k: v for k, v in r.items() if k != "seconds"} == \
            {k: v for k, v in by_json[r["target"]].items() if k != "seconds"}
    assert next(iter(by_json.values())).keys() == set(ROW_FIELDS)


def test_a_crashing_target_is_an_error_row(tmp_path, monkeypatch, tree):
    (tmp_path / "crash.py").write_text(CRASH)
    monkeypatch.chdir(tmp_path)
    good = [str(tree / "runs" / "tied.pt"), "crash.py:model", str(tree / "runs" / "a" / "broken.safetensors")]
    (tmp_path / "targets.txt").write_text("# a fleet\n" + "\n".join([good[0], "crash.py:segfault", *good[1:]]) + "\n\n")
    res = CliRunner().invoke(main, ["scan", "--from", "targets.txt", "-o", "rows.csv", "--jobs", "2"])
    assert res.exit_code == 1, res.output
    rows = _rows((tmp_path / "rows.csv").read_text())
    assert sorted(rows) == sorted([*good, "crash.py:segfault"])
    assert rows["crash.py:segfault"]["error"] == ("the worker process died while reading this target (killed by "
                                                  "SIGSEGV); the rest of the scan went on")
    assert rows["crash.py:model"]["format"] == "python spec"
    assert rows[good[0]]["verdict"] == "tied"
    assert "1 unreadable" in res.output


def test_an_interrupted_scan_resumes_without_duplicate_rows(tmp_path, monkeypatch):
    names = [f"t{i}.py:model" for i in range(12)]
    for n in names:  # twelve targets of 0.4 s each: time to stop the scan in the middle
        (tmp_path / n.split(":")[0]).write_text(SLOW)
    (tmp_path / "targets.txt").write_text("\n".join(names) + "\n")
    cmd = [sys.executable, "-m", "tiecheck", "scan", "--from", "targets.txt", "-o", "rows.jsonl", "--jobs", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "CI": "true"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out = tmp_path / "rows.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "tiecheck: interrupted" in err, err
    written = [json.loads(line)["target"] for line in out.read_text().splitlines()]
    assert 3 <= len(written) < len(names)
    with out.open("a") as fh:
        fh.write('{"target": "t11.py:model", "format": "pyth')  # and a row cut in the middle of its write
    monkeypatch.chdir(tmp_path)  # the specs are named relative to the folder they are in
    res = CliRunner().invoke(main, ["scan", "--from", "targets.txt", "-o", "rows.jsonl", "--resume", "--jobs", "2"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["target"] for r in rows) == sorted(names)  # every target once
    assert all(r["format"] == "python spec" and r["error"] == "" for r in rows)
    assert f"{len(written)} already in rows.jsonl" in res.output


def test_remote_targets_in_a_list(tmp_path, tree):
    with FileServer(tree / "runs" / "a") as srv:
        (tmp_path / "targets.txt").write_text(f"{srv.url_of('untied.safetensors')}\n{tree / 'runs' / 'tied.pt'}\n")
        res = CliRunner().invoke(main, ["scan", "--from", str(tmp_path / "targets.txt"), "--format", "jsonl",
                                        "--jobs", "1"])
    rows = {r["target"]: r for r in map(json.loads, res.stdout.splitlines())}
    remote = rows[srv.url_of("untied.safetensors")]
    assert remote["verdict"] == "untied"
    assert remote["format"] == "safetensors"
    assert 0 < remote["bytes_fetched"] == srv.sent["untied.safetensors"] < (tree / "runs/a/untied.safetensors").stat().st_size
    assert rows[str(tree / "runs" / "tied.pt")]["bytes_fetched"] == 0
    assert res.stderr.startswith("scan: 2 checkpoints")


@pytest.mark.parametrize(("args", "message"), [
    (["{tree}", "--from", "x.txt"], "give a folder to scan (ROOT) or a list of targets (--from FILE), not both"),
    (["{tree}", "--resume"], "--resume goes on with an output file"),
    (["{tree}/runs/tied.pt"], "not a folder"),
    (["{tree}/runs", "-o", "{tree}/runs/tied.pt"], "refusing to write the rows to"),
    (["{tree}", "-o", "{tree}/hf/twice/rows.csv"], "lies inside the input folder"),
    (["{tree}/runs", "-o", "{existing}"], "exists: --resume goes on with it"),
])
def test_bad_scans_are_one_line(tree, tmp_path, args, message):
    existing = tmp_path / "old.csv"
    existing.write_text("target\n")
    argv = [a.format(tree=tree, existing=existing) for a in args]
    res = CliRunner().invoke(main, ["scan", *argv])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1, res.output
    assert message in res.output, res.output
    assert not (tree / "hf" / "twice" / "rows.csv").exists()


def test_scan_target_is_the_row_of_any_target(tree):
    row = scan_target(str(tree / "runs" / "bad.safetensors"))
    assert list(row) == list(ROW_FIELDS)
    assert row["verdict"] == ""
    assert "not a valid safetensors file" in row["error"]
