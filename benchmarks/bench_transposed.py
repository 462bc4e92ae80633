"""The transposed-copy pass at the content pass's cost discipline.

Run: pytest benchmarks/bench_transposed.py --benchmark-only -s
Target (issue "Ties as the ecosystem declares them"): on 512 MiB of random 2-D fp32 tensors in
two swapped shapes with one planted transposed copy (and one near copy whose samples agree), the
pass reads under 5% of the file beyond the pairs it compares in full, and resident growth stays
under 10% of the file (the inspect target: the column blocks of the transposed side are read with
pread, block by block, never mapped in).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_child

SETUP = "import torch, tiecheck, tiecheck.api, tiecheck.loaders.content"
INSPECT = ("_r = tiecheck.analyze({path!r}); _c = _r.content; _t = _c.transposed; "
           "_out['copies'] = [list(c.names) for c in _c.copies]; _out['bytes_read'] = _t.bytes_read; "
           "_out['full'] = _t.full_comparisons")
ROWS, COLS, PER_SHAPE = 1024, 2048, 32


@pytest.fixture(scope="module")
def planted_transpose_file(tmp_path_factory):
    """512 MiB safetensors: 32 random (1024, 2048) and 32 random (2048, 1024) fp32 tensors; b.7 holds
    a.3's transpose, b.20 holds it too but for one element the samples never read."""
    from safetensors.torch import save_file  # noqa: PLC0415 - the benchmark's own fixture dependency

    path = tmp_path_factory.mktemp("transposed") / "swapped.safetensors"
    g = torch.Generator().manual_seed(2)
    sd = {f"a.{i}": torch.randn(ROWS, COLS, generator=g) for i in range(PER_SHAPE)}
    sd.update({f"b.{i}": torch.randn(COLS, ROWS, generator=g) for i in range(PER_SHAPE)})
    sd["b.7"] = sd["a.3"].t().contiguous()
    near = sd["a.3"].t().contiguous()
    near[5, 5] += 1.0  # flat index 5 * 1024 + 5: between the sample runs
    sd["b.20"] = near
    save_file(sd, str(path))
    del sd
    return path


def test_planted_transpose_reads_little(benchmark, planted_transpose_file, publish):
    code = INSPECT.format(path=str(planted_transpose_file))
    base = run_child("", setup=SETUP)
    res = benchmark.pedantic(lambda: run_child(code, setup=SETUP), rounds=1, iterations=1)
    size = os.path.getsize(planted_transpose_file)
    pair = 2 * ROWS * COLS * 4
    full = res["full"] * pair  # each full comparison reads both tensors once
    beyond = res["bytes_read"] - full
    rss_growth = (res["peak_rss_mib"] - base["peak_rss_mib"]) * 2**20
    benchmark.extra_info.update(bytes_read=res["bytes_read"], full_comparisons=res["full"],
                                beyond_share=beyond / size, rss_growth_share=rss_growth / size, wall_s=res["wall_s"])
    publish(f"\n{size / 2**20:.0f} MiB file: transposed pass read {res['bytes_read'] / 2**20:.2f} MiB "
          f"({res['full']} pairs in full = {full / 2**20:.0f} MiB; {beyond / size:.4%} of the file beyond them); "
          f"resident growth {rss_growth / 2**20:.0f} MiB ({rss_growth / size:.1%}); {res['wall_s']:.2f} s "
          f"(the whole analysis, duplicate pass included, imports are setup); the OS counts "
          f"{res['rchar'] / 2**20:.2f} MiB read by the whole analysis (rchar: both passes and the header)")
    assert res["copies"] == [["a.3", "b.7"]]
    assert res["full"] == 2
    assert beyond < 0.05 * size
    assert rss_growth < 0.10 * size
