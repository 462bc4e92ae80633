"""Speed and memory of `inspect`, each against its baseline measured in the same run.

Run: pytest benchmarks/bench_inspect.py --benchmark-only -s
Targets (from the foundation issue):
- inspect of a >= 1 GB tied state dict, content pass included: peak RSS within the torch-import
  baseline + 10% of the file size, and wall time under a plain torch.load of the same file;
- on 1 GiB of same-shape random tensors with one planted duplicate, under 5% of the bytes read
  beyond the duplicate pair;
- `tiecheck --help` and `tiecheck models` under 0.5 s without importing torch;
- tie analysis of an 8B Llama-shaped module on the meta device under 50 ms, beside accelerate's
  find_tied_parameters on the same module;
- 1,000 to 1,000,000 small tensors, 100,000 square ones and 100,000 equal ones against a listing of
  the same file (figures printed, not asserted beyond the 100,000-tensor bound: see README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import run_child

from tiecheck.api import analyze_subject
from tiecheck.loaders import from_module

SETUP = "import torch, tiecheck, tiecheck.api, tiecheck.loaders.content"
LOAD = "_sd = torch.load({path!r}, map_location='cpu', weights_only=True)"
INSPECT = ("_r = tiecheck.analyze({path!r}); "
           "_out['groups'] = len(_r.tie_groups); _out['bytes_read'] = _r.content.stats.bytes_read; "
           "_out['dups'] = [list(d.names) for d in _r.untied_duplicates if not d.constant]")


def test_inspect_big_tied_file_vs_torch_load(benchmark, tied_bf16_file, publish):
    size_mib = os.path.getsize(tied_bf16_file) / 2**20
    base = run_child("", setup=SETUP)
    load = run_child(LOAD.format(path=str(tied_bf16_file)), setup=SETUP)
    insp = benchmark.pedantic(lambda: run_child(INSPECT.format(path=str(tied_bf16_file)), setup=SETUP),
                              rounds=3, iterations=1)
    # The child's own wall time excludes interpreter start-up; compare like with like.
    benchmark.extra_info.update(file_mib=round(size_mib), torch_import_rss_mib=round(base["peak_rss_mib"]),
                                torch_load_rss_mib=round(load["peak_rss_mib"]), torch_load_s=load["wall_s"],
                                inspect_rss_mib=round(insp["peak_rss_mib"]), inspect_s=insp["wall_s"])
    publish(f"\nfile {size_mib:.0f} MiB | torch import {base['peak_rss_mib']:.0f} MiB | "
          f"torch.load {load['wall_s']:.2f} s {load['peak_rss_mib']:.0f} MiB | "
          f"inspect {insp['wall_s']:.2f} s {insp['peak_rss_mib']:.0f} MiB "
          f"(time ratio {insp['wall_s'] / load['wall_s']:.2f}, RSS over import {insp['peak_rss_mib'] - base['peak_rss_mib']:.0f} MiB "
          f"= {(insp['peak_rss_mib'] - base['peak_rss_mib']) / size_mib:.1%} of the file)")
    assert insp["groups"] == 1
    assert insp["peak_rss_mib"] <= base["peak_rss_mib"] + 0.10 * size_mib
    assert insp["wall_s"] < load["wall_s"]


def test_planted_duplicate_reads_little(benchmark, planted_duplicate_file, publish):
    code = INSPECT.format(path=str(planted_duplicate_file))
    base = run_child("", setup=SETUP)
    res = benchmark.pedantic(lambda: run_child(code, setup=SETUP), rounds=2, iterations=1)
    size = os.path.getsize(planted_duplicate_file)
    pair = 2 * 4 * 1024 * 1024
    # "Read" is the OS count (rchar: every byte the inspection read, headers included), the same
    # count bench_formats quotes; the content pass's own counter is kept beside it for comparison.
    beyond = res["rchar"] - pair
    rss_growth = (res["peak_rss_mib"] - base["peak_rss_mib"]) * 2**20
    benchmark.extra_info.update(rchar=res["rchar"], content_bytes_read=res["bytes_read"],
                                beyond_pair_share=beyond / size, rss_growth_share=rss_growth / size)
    publish(f"\n{size / 2**20:.0f} MiB file: inspection read {res['rchar'] / 2**20:.2f} MiB (rchar; the "
            f"content pass counts {res['bytes_read'] / 2**20:.2f} MiB of tensor data) "
          f"({beyond / size:.3%} of the file beyond the duplicate pair); resident growth "
          f"{rss_growth / 2**20:.0f} MiB ({rss_growth / size:.1%} of the file)")
    assert res["dups"] == [["layers.17.weight", "layers.200.weight"]]
    assert beyond < 0.05 * size
    assert rss_growth < 0.05 * size + pair


@pytest.mark.parametrize("args", [["--help"], ["models"]])
def test_cli_start_without_torch(benchmark, args, publish):
    exe = [sys.executable, "-m", "tiecheck.cli", *args]

    def python_only():
        subprocess.run([sys.executable, "-c", "pass"], check=True, capture_output=True)

    t0 = time.perf_counter()
    for _ in range(5):
        python_only()
    bare = (time.perf_counter() - t0) / 5
    benchmark.pedantic(lambda: subprocess.run(exe, check=True, capture_output=True), rounds=5, iterations=1)
    median = benchmark.stats.stats.median
    publish(f"\ntiecheck {' '.join(args)}: {median:.3f} s (bare python start {bare:.3f} s)")
    assert median < 0.5
    code = f"import sys; sys.argv = ['tiecheck', {args[0]!r}]\ntry:\n from tiecheck.cli import main; main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_meta_8b_tie_analysis_vs_accelerate(benchmark, publish):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    accelerate_utils = pytest.importorskip("accelerate.utils")

    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.tie_weights()
    n = sum(p.numel() for p in model.parameters())
    subject = from_module(model)
    report = benchmark(lambda: analyze_subject(subject, duplicates=False))
    ours = benchmark.stats.stats.median
    t0 = time.perf_counter()
    for _ in range(5):
        theirs_groups = accelerate_utils.find_tied_parameters(model)
    theirs = (time.perf_counter() - t0) / 5
    benchmark.extra_info.update(params=n, tiecheck_s=ours, accelerate_s=theirs)
    # Timed in this process (the model is built here, on meta), not in a fresh interpreter.
    publish(f"\n{n / 1e9:.2f}B-param Llama on meta, in-process: tiecheck tie analysis {ours * 1e3:.1f} ms, accelerate "
          f"find_tied_parameters {theirs * 1e3:.1f} ms (ratio {ours / theirs:.2f})")
    assert [list(g.names) for g in report.tie_groups] == [sorted(theirs_groups[0])]
    assert ours < 0.050


# -- many small tensors: cost against tensor count ----------------------------------------------

# safetensors up to a million tensors; torch.save up to 100,000 (a pickle of a million storages
# takes minutes to write on a 2-core machine, and torch.load's listing of it longer).
COUNTS = [1_000, 10_000, 100_000, 1_000_000]
TORCH_SAVE_MAX = 100_000
RUNS = 3  # whole processes of each, interleaved: the fastest time and the highest peak

# Whole processes: interpreter start, torch import, the work, exit. The child reports its VmHWM.
_HWM = ("import atexit, sys\n"
        "def _hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            print('VmHWM', int(line.split()[1]) // 1024, file=sys.stderr)\n"
        "atexit.register(_hwm)\n")
LIST_SAFETENSORS = ("import torch\nfrom safetensors import safe_open\n"
                    "with safe_open({path!r}, 'pt') as f:\n"
                    "    rows = [(k, f.get_slice(k).get_shape()) for k in f.keys()]\n")
LIST_TORCH = ("import torch\n"
              "sd = torch.load({path!r}, mmap=True, weights_only=True)\n"
              "rows = [(k, tuple(v.shape)) for k, v in sd.items()]\n")
INSPECT_CLI = ("import sys\nsys.argv = ['tiecheck', 'inspect', {path!r}, *{extra!r}]\n"
               "from tiecheck.cli import main\n"
               "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n")


def _whole_process(code: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _HWM + code], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    hwm = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VmHWM")]
    return wall, hwm[-1]


def _inspect(path, *extra: str) -> str:
    return INSPECT_CLI.format(path=str(path), extra=list(extra))


def _interleaved(baseline: str, ours: str, runs: int = RUNS) -> tuple[float, int, float, int]:
    """(fastest s, highest peak MiB) of the baseline and of ours, ``runs`` of each, alternating, so a
    neighbour's burst on a shared machine lands on both sides rather than deciding the ratio."""
    pairs = [(_whole_process(baseline), _whole_process(ours)) for _ in range(runs)]
    return (min(b[0] for b, _ in pairs), max(b[1] for b, _ in pairs),
            min(o[0] for _, o in pairs), max(o[1] for _, o in pairs))


def _save_numpy(path, tensors: dict) -> None:
    """safetensors' own writer, from NumPy: a million small tensors are made in seconds, not minutes."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file(tensors, str(path))


@pytest.fixture(scope="module")
def many_tensor_files(tmp_path_factory):
    """For each count: the same small tensors as one safetensors file and (up to TORCH_SAVE_MAX) one torch.save file."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("many")
    files = {}
    for n in COUNTS:
        # 4 fp32 values each, all distinct so the content pass compares nothing. MoE-like names; a
        # million of those would pass safetensors' 100 MB header limit, so that file's are short.
        name = "model.layers.{}.mlp.experts.{}.w" if n <= TORCH_SAVE_MAX else "m.l.{}.e.{}.w"
        sd = {name.format(i // 256, i % 256): np.full(4, i, dtype=np.float32) for i in range(n)}
        st = folder / f"t{n}.safetensors"
        _save_numpy(st, sd)
        pt = None
        if n <= TORCH_SAVE_MAX:
            pt = folder / f"t{n}.pt"
            torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pt)
        files[n] = (st, pt)
        del sd
    return files


@pytest.mark.parametrize("fmt", ["safetensors", "torch.save"])
def test_inspect_many_tensors_vs_listing(benchmark, many_tensor_files, fmt, publish):
    rows = []
    for n, (st, pt) in many_tensor_files.items():
        path = st if fmt == "safetensors" else pt
        if path is None:
            continue
        listing = (LIST_SAFETENSORS if fmt == "safetensors" else LIST_TORCH).format(path=str(path))
        rows.append((n, *_interleaved(listing, _inspect(path))))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    baseline = "safe_open listing" if fmt == "safetensors" else "torch.load(mmap) listing"
    publish(f"\n{fmt}, {RUNS} runs each interleaved (fastest s, highest peak MiB): tensors | {baseline} | "
            f"tiecheck inspect | time ratio | peak over the listing | per tensor beyond 1,000 (listing, ours)")
    first = rows[0]
    for n, base_s, base_mib, ours_s, ours_mib in rows:
        grow = (f"{(base_s - first[1]) / (n - first[0]) * 1e6:5.1f} us, {(ours_s - first[3]) / (n - first[0]) * 1e6:5.1f} us"
                if n > first[0] else "")
        publish(f"{n:>9,} | {base_s:7.2f} s {base_mib:5d} MiB | {ours_s:7.2f} s {ours_mib:5d} MiB | "
                f"{ours_s / base_s:5.2f}x | {ours_mib / base_mib - 1:+6.1%} | {grow}")
    n, base_s, _, ours_s, ours_mib = next(r for r in rows if r[0] == 100_000)
    assert ours_s < 2 * base_s
    assert ours_mib < 400


# -- 100,000 square 8x8 tensors: the transposed-copy pass's worst case ---------------------------

SQUARE = 100_000


@pytest.fixture(scope="module")
def square_tensor_file(tmp_path_factory):
    """100,000 distinct 8x8 fp32 matrices named as a mixture of experts' weights."""
    np = pytest.importorskip("numpy")
    path = tmp_path_factory.mktemp("square") / "square.safetensors"
    _save_numpy(path, {f"model.layers.{i // 256}.mlp.experts.{i % 256}.w.weight":
                       (np.arange(64, dtype=np.float32) + 64 * i).reshape(8, 8) for i in range(SQUARE)})
    return path


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_inspect_square_tensors_vs_listing(benchmark, square_tensor_file, fmt, tmp_path, publish):
    extra = () if fmt == "table" else ("--format", "json", "-o", str(tmp_path / "r.json"))
    base_s, base_mib, ours_s, ours_mib = _interleaved(LIST_SAFETENSORS.format(path=str(square_tensor_file)),
                                                      _inspect(square_tensor_file, *extra))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info["row"] = (SQUARE, fmt, base_s, base_mib, ours_s, ours_mib)
    publish(f"\n{SQUARE:,} square 8x8 tensors, {fmt}, {RUNS} runs each interleaved: safe_open listing "
            f"{base_s:.2f} s {base_mib} MiB | tiecheck inspect {ours_s:.2f} s {ours_mib} MiB | "
            f"{ours_s / base_s:.2f}x, peak {ours_mib / base_mib - 1:+.1%}")
    if fmt == "json":
        content = json.loads((tmp_path / "r.json").read_text())["content_pass"]
        assert content["transposed"]["sampled"] == 2 * SQUARE  # each matrix both ways, none compared in full
        assert content["transposed"]["full_comparisons"] == 0


# -- 100,000 equal tensors: the content pass's all-equal worst case -----------------------------


@pytest.fixture(scope="module")
def equal_tensor_file(tmp_path_factory):
    """100,000 identical 4-element fp32 tensors: one duplicate group of them all."""
    np = pytest.importorskip("numpy")
    path = tmp_path_factory.mktemp("equal") / "equal.safetensors"
    _save_numpy(path, {f"model.layers.{i // 256}.mlp.experts.{i % 256}.w": np.arange(4, dtype=np.float32)
                       for i in range(SQUARE)})
    return path


def test_inspect_equal_tensors_vs_listing(benchmark, equal_tensor_file, tmp_path, publish):
    out = tmp_path / "r.json"
    base_s, base_mib, ours_s, ours_mib = _interleaved(LIST_SAFETENSORS.format(path=str(equal_tensor_file)),
                                                      _inspect(equal_tensor_file, "--format", "json", "-o", str(out),
                                                               "--fail-on", "never"))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    report = json.loads(out.read_text())
    (group,) = report["untied_duplicates"]
    publish(f"\n{SQUARE:,} equal 4-element tensors, json, {RUNS} runs each interleaved: safe_open listing "
            f"{base_s:.2f} s {base_mib} MiB | tiecheck inspect {ours_s:.2f} s {ours_mib} MiB | "
            f"{ours_s / base_s:.2f}x, peak {ours_mib / base_mib - 1:+.1%}; one group of {len(group['names']):,}, "
            f"{report['content_pass']['full_comparisons']} full comparisons")
    assert len(group["names"]) == SQUARE


# -- a sharded index: 160 shards, 90,000 names ------------------------------------------------

SHARDS, SHARDED_NAMES = 160, 90_000
LIST_SHARDS = ("import json, os, torch\nfrom safetensors import safe_open\n"
               "index = {path!r}\n"
               "shards = sorted(set(json.load(open(index))['weight_map'].values()))\n"
               "rows = []\n"
               "for shard in shards:\n"
               "    with safe_open(os.path.join(os.path.dirname(index), shard), 'pt') as f:\n"
               "        rows += [(k, f.get_slice(k).get_shape()) for k in f.keys()]\n")


def write_sharded_index(folder, shards: int = SHARDS, names: int = SHARDED_NAMES):
    """A ``model.safetensors.index.json`` over ``shards`` files holding ``names`` small tensors in all.

    MoE-like names (``model.layers.{L}.mlp.experts.{E}.{w1,w2,w3}.weight``), 4 fp32 values each, all
    distinct, so the content pass compares nothing. Returns the index path.
    """
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    experts = 500
    all_names = [f"model.layers.{i // (3 * experts)}.mlp.experts.{(i // 3) % experts}.w{i % 3 + 1}.weight"
                 for i in range(names)]
    per = -(-names // shards)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = all_names[s * per:(s + 1) * per]
        base = s * per
        safetensors_torch.save_file({n: torch.full((4,), float(base + j)) for j, n in enumerate(chunk)},
                                    folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": names * 16}, "weight_map": weight_map}))
    return index


@pytest.fixture(scope="module")
def sharded_index(tmp_path_factory):
    return write_sharded_index(tmp_path_factory.mktemp("sharded"))


def test_inspect_sharded_index_vs_listing(benchmark, sharded_index, publish):
    path = str(sharded_index)
    # Three of each, interleaved: the fastest time (on a shared machine a neighbour's burst during
    # one run would otherwise decide the ratio) and the highest peak.
    runs = [(_whole_process(LIST_SHARDS.format(path=path)), _whole_process(_inspect(path)))
            for _ in range(3)]
    base_s, base_mib = min(b[0] for b, _ in runs), max(b[1] for b, _ in runs)
    ours_s, ours_mib = min(o[0] for _, o in runs), max(o[1] for _, o in runs)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info["runs"] = runs
    benchmark.extra_info["row"] = (SHARDED_NAMES, SHARDS, base_s, base_mib, ours_s, ours_mib)
    publish("\nsharded safetensors index, 3 runs each (fastest s, highest peak MiB): tensors, shards | "
            "safe_open listing s, peak MiB | "
            "tiecheck inspect s, peak MiB | time ratio")
    publish(f"{SHARDED_NAMES:>9,}, {SHARDS} | {base_s:7.2f} s {base_mib:5d} MiB | {ours_s:7.2f} s {ours_mib:5d} MiB | "
            f"{ours_s / base_s:5.2f}x")
    assert ours_s < 2 * base_s
    assert ours_mib < 400
