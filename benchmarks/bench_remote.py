"""A 100-shard checkpoint inspected over HTTP fetches its headers, a few samples, and nothing more.

Run: pytest benchmarks/bench_remote.py --benchmark-only -s
Target (issue 32): inspecting a 100-shard safetensors checkpoint served on the loopback (an
``http.server`` with byte ranges, ``tests/support/servers.py``) fetches at most the sum of its
shards' header sizes + 1 MiB, the content pass included.

The shards hold random float32 data (a content pass over equal data would compare it in full),
400 tensors of one shape, so every tensor is sampled. The bytes counted are those the server
sent (the body bytes of every reply), not a counter of tiecheck's own; the report's
``remote.bytes_fetched`` is shown beside them. Each inspection runs in a fresh interpreter
(``run_child``; imports are setup), the server in this process. Baseline, in the same run: the
same checkpoint inspected from its local folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_child
from safetensors.torch import save_file

from support.servers import FileServer

SHARDS, PER_SHARD, SHAPE = 100, 4, (256, 256)
SETUP = "import tiecheck, tiecheck.api, tiecheck.loaders.remote, tiecheck.loaders.formats.safetensors_files, huggingface_hub\n"
INSPECT = ("_r = tiecheck.analyze({target!r}); _d = _r.to_dict()\n"
           "_out['tensors'] = len(_d['tensors']); _out['fetched'] = (_d.get('remote') or {{}}).get('bytes_fetched')\n"
           "_out['requests'] = (_d.get('remote') or {{}}).get('requests'); _out['sampled'] = _d['content_pass']['sampled']\n"
           "_out['duplicates'] = len(_d['untied_duplicates'])")


@pytest.fixture(scope="session")
def shards100(tmp_path_factory):
    """(folder, sum of the shards' header sizes, bytes of the files): 100 safetensors shards and an index."""
    folder = tmp_path_factory.mktemp("remote100") / "ckpt"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map, headers = {}, 0
    for s in range(SHARDS):
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {f"layers.{s}.w{i}.weight": torch.randn(*SHAPE, generator=g) for i in range(PER_SHARD)}
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})
        headers += 8 + int.from_bytes((folder / name).read_bytes()[:8], "little")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    size = sum(p.stat().st_size for p in folder.iterdir())
    return folder, headers, size


def test_remote_100_shards(benchmark, shards100, publish):
    folder, headers, size = shards100
    index = folder / "model.safetensors.index.json"
    local = run_child(INSPECT.format(target=str(index)), setup=SETUP)
    with FileServer(folder) as srv:
        url = srv.url_of(index.name)
        rounds = []

        def once() -> dict:
            srv.sent.clear()
            res = run_child(INSPECT.format(target=url), setup=SETUP)
            rounds.append((res, sum(srv.sent.values())))
            return res

        benchmark.pedantic(once, rounds=3, iterations=1)
    res, sent = rounds[-1]
    limit = headers + (1 << 20)
    benchmark.extra_info.update(files_mib=round(size / 2**20, 1), header_bytes=headers, sent=sent,
                                fetched=res["fetched"], requests=res["requests"], remote_s=res["wall_s"],
                                local_s=local["wall_s"])
    publish(f"\n{SHARDS} shards, {SHARDS * PER_SHARD} tensors, {size / 2**20:.1f} MiB, headers {headers:,} bytes | "
            f"inspect over HTTP (content pass included, {res['sampled']} tensors sampled): the server sent "
            f"{sent:,} bytes = headers + {(sent - headers) / 2**10:.0f} KiB ({sent / size:.2%} of the files; limit "
            f"headers + 1 MiB), report says {res['fetched']:,} bytes in {res['requests']:,} range requests, "
            f"{res['wall_s']:.2f} s | local inspect of the same folder {local['wall_s']:.2f} s | time ratio "
            f"{res['wall_s'] / local['wall_s']:.1f}")
    assert res["tensors"] == local["tensors"] == SHARDS * PER_SHARD
    assert res["duplicates"] == local["duplicates"] == 0
    assert all(s == sent for _, s in rounds)
    assert res["fetched"] == sent
    assert sent <= limit
