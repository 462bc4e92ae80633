"""Memory of `inspect` on a 1 GiB ONNX model whose weights sit in an external data file.

Run: pytest benchmarks/bench_onnx.py --benchmark-only -s
Target (issue: ONNX and GGUF): peak RSS within the import baseline + 10% of the file size. The
model is what the TorchScript exporter writes for a tied model: an embedding read by a Gather
and its transposed copy read by the head's MatMul, 512 MiB each, in one sparse external data
file (built in a second); inspecting it compares the two initializers in full, block by block.
"""

from __future__ import annotations

import os

import pytest
from conftest import run_child

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402 - after the importorskip that guards it

V, D = 131072, 1024  # 512 MiB of float32 each
SETUP = "import torch, onnx, tiecheck, tiecheck.api, tiecheck.loaders.content, tiecheck.loaders.formats.onnx_files"
INSPECT = ("_r = tiecheck.analyze({path!r}); _out['pairs'] = [p['relation'] for p in "
           "_r.extra['onnx']['embedding_head']]; _out['bytes_read'] = _r.content.stats.bytes_read")


def _external(name: str, dims: tuple[int, int], offset: int) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type, t.data_location = name, TensorProto.FLOAT, TensorProto.EXTERNAL
    t.dims.extend(dims)
    for k, v in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(V * D * 4))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


@pytest.fixture(scope="session")
def big_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    with open(folder / "big.onnx.data", "wb") as fh:
        fh.truncate(2 * V * D * 4)  # sparse: zeros, the transpose of zeros
    nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["h"], name="/embed/Gather"),
             helper.make_node("MatMul", ["h", "onnx::MatMul_9"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, V])],
                              initializer=[_external("embed.weight", (V, D), 0),
                                           _external("onnx::MatMul_9", (D, V), V * D * 4)])
    path = folder / "big.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def test_inspect_onnx_with_external_data_memory(benchmark, big_onnx, publish):
    size_mib = (os.path.getsize(big_onnx) + os.path.getsize(big_onnx.parent / "big.onnx.data")) / 2**20
    base = run_child("", setup=SETUP)
    res = benchmark.pedantic(lambda: run_child(INSPECT.format(path=str(big_onnx)), setup=SETUP),
                             rounds=1, iterations=1)
    over = res["peak_rss_mib"] - base["peak_rss_mib"]
    benchmark.extra_info.update(file_mib=round(size_mib), import_rss_mib=round(base["peak_rss_mib"]),
                                inspect_rss_mib=round(res["peak_rss_mib"]), inspect_s=res["wall_s"])
    publish(f"\nfile {size_mib:.0f} MiB | import {base['peak_rss_mib']:.0f} MiB | inspect {res['wall_s']:.2f} s "
            f"{res['peak_rss_mib']:.0f} MiB (over import {over:.0f} MiB = {over / size_mib:.1%} of the file)")
    assert res["pairs"] == ["transposed copy"]
    assert res["peak_rss_mib"] <= base["peak_rss_mib"] + 0.10 * size_mib
