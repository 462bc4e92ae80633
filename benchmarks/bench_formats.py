"""Inspecting an 8B-shaped sharded safetensors folder reads headers, not tensor data.

Run: pytest benchmarks/bench_formats.py --benchmark-only -s
Target (issue 3): without the content pass, inspecting a Llama-3-8B-shaped folder (4 shards,
16 GB of bf16) takes well under a second and under 300 MB peak RSS, because the headers are
parsed and the data only memory-mapped. With the config (the Hugging Face folder), the
declared-layer check also reads a sample of the embedding and of the head it declares untied. The shards are written as real headers followed by
sparse data (``truncate``), so the files have their full size but cost no disk.

Each measurement runs in a fresh interpreter (``run_child``): peak RSS is the child's own
high-water mark, wall time covers ``tiecheck.analyze(path, duplicates=False)`` alone — the
analysis ``tiecheck inspect PATH --no-duplicates`` runs, without the CLI, its imports and the
rendering of the report (imports are in the setup) — and
``rchar`` from /proc/self/io counts the bytes the inspection read with read()/pread().
Baseline, in the same run: the safetensors library's own lazy ``safe_open`` reading every
shard's header.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_child

# Llama-3-8B: vocab 128256, hidden 4096, MLP 14336, 32 layers, 32 heads of 128, 8 KV heads, untied head.
V, D, FF, LAYERS, KV = 128256, 4096, 14336, 32, 1024
SHARDS = 4

SETUP = ("import os, torch, tiecheck, tiecheck.api, tiecheck.loaders, tiecheck.loaders.detect, "
         "tiecheck.loaders.formats.safetensors_files, tiecheck.loaders.formats.hf, tiecheck.loaders.formats.dcp, tiecheck.report.render, "
         "tiecheck.loaders.fileview\n"
         "def _rchar():\n"
         "    for line in open('/proc/self/io'):\n"
         "        if line.startswith('rchar:'):\n"
         "            return int(line.split()[1])\n")
INSPECT = ("_r0 = _rchar(); _r = tiecheck.analyze({path!r}, duplicates=False); _out['read'] = _rchar() - _r0; "
           "_out['tensors'] = len(_r.tensors); _out['params'] = _r.summary.params_unique; "
           "_out['groups'] = [list(g.names) for g in _r.tie_groups]")
SAFE_OPEN = ("from safetensors import safe_open\n"
             "_r0 = _rchar(); _n = 0\n"
             "for _f in sorted(os.listdir({path!r})):\n"
             "    if _f.endswith('.safetensors'):\n"
             "        with safe_open(os.path.join({path!r}, _f), framework='pt') as _h:\n"
             "            for _k in _h.keys():\n"
             "                _s = _h.get_slice(_k); _s.get_shape(); _s.get_dtype(); _n += 1\n"
             "_out['read'] = _rchar() - _r0; _out['tensors'] = _n")


def llama8b_shapes() -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [V, D]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [D, D], p + "self_attn.k_proj.weight": [KV, D],
                       p + "self_attn.v_proj.weight": [KV, D], p + "self_attn.o_proj.weight": [D, D],
                       p + "mlp.gate_proj.weight": [FF, D], p + "mlp.up_proj.weight": [FF, D],
                       p + "mlp.down_proj.weight": [D, FF], p + "input_layernorm.weight": [D],
                       p + "post_attention_layernorm.weight": [D]})
    shapes["model.norm.weight"] = [D]
    shapes["lm_head.weight"] = [V, D]
    return shapes


def write_sparse_shard(path, shapes: dict[str, list[int]]) -> int:
    """A real safetensors header for bf16 tensors, then sparse data of the right length.

    The head's first bytes are written (an untied head differs from the embedding, and the
    declared-layer check compares the two by samples first): all zeros, the two would be equal
    and their whole 2 GB compared, which no real checkpoint asks for.
    """
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(len(hb).to_bytes(8, "little") + hb)
        fh.truncate(8 + len(hb) + off)
        if "lm_head.weight" in shapes:
            fh.seek(8 + len(hb) + header["lm_head.weight"]["data_offsets"][0])
            fh.write(bytes(range(1, 65)))
    return 8 + len(hb)


@pytest.fixture(scope="session")
def llama8b_folder(tmp_path_factory):
    """(safetensors folder, HF folder with config.json over the same shards, header bytes, params)."""
    root = tmp_path_factory.mktemp("llama8b")
    folder, hf = root / "sharded", root / "hf"
    folder.mkdir()
    hf.mkdir()
    shapes = llama8b_shapes()
    names = list(shapes)
    per = -(-len(names) // SHARDS)
    weight_map, header_bytes = {}, 0
    for i in range(SHARDS):
        fname = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        header_bytes += write_sparse_shard(folder / fname, {n: shapes[n] for n in part})
        weight_map.update({n: fname for n in part})
        os.symlink(folder / fname, hf / fname)
    index = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(index)
    (hf / "model.safetensors.index.json").write_text(index)
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": 32, "num_key_value_heads": 8,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192}))
    params = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        params += n
    return folder, hf, header_bytes, params


def test_sharded_8b_headers_only(benchmark, llama8b_folder, publish):
    folder, _, header_bytes, params = llama8b_folder
    size = sum(p.stat().st_size for p in folder.iterdir())
    base = run_child("", setup=SETUP)
    ref = run_child(SAFE_OPEN.format(path=str(folder)), setup=SETUP)
    res = benchmark.pedantic(lambda: run_child(INSPECT.format(path=str(folder)), setup=SETUP), rounds=3,
                             iterations=1)
    benchmark.extra_info.update(files_gib=round(size / 2**30, 2), header_bytes=header_bytes,
                                inspect_s=res["wall_s"], inspect_rss_mib=round(res["peak_rss_mib"]),
                                import_rss_mib=round(base["peak_rss_mib"]), inspect_read=res["read"],
                                safe_open_s=ref["wall_s"], safe_open_read=ref["read"])
    publish(f"\n{size / 2**30:.1f} GiB in {SHARDS} shards, {params / 1e9:.2f}B params, {header_bytes:,} header bytes | "
          f"tiecheck.analyze(duplicates=False) {res['wall_s'] * 1e3:.0f} ms, peak RSS {res['peak_rss_mib']:.0f} MiB "
          f"(imports alone {base['peak_rss_mib']:.0f} MiB), read {res['read']:,} bytes | safetensors safe_open "
          f"headers {ref['wall_s'] * 1e3:.0f} ms, read {ref['read']:,} bytes | time ratio "
          f"{res['wall_s'] / ref['wall_s']:.2f}")
    assert res["tensors"] == 32 * 9 + 3
    assert res["params"] == params
    assert res["groups"] == []
    assert res["wall_s"] < 1.0
    assert res["peak_rss_mib"] < 300
    index = (folder / "model.safetensors.index.json").stat().st_size
    # The headers and the index once each, plus 16-byte format sniffs: never tensor data.
    assert res["read"] < header_bytes + index + (16 << 10)


def test_hf_8b_folder_with_architecture(benchmark, llama8b_folder, publish):
    pytest.importorskip("transformers")
    _, hf, header_bytes, params = llama8b_folder
    setup = SETUP + "import transformers, transformers.models.llama.modeling_llama\n"
    base = run_child("", setup=setup)
    res = benchmark.pedantic(lambda: run_child(INSPECT.format(path=str(hf)), setup=setup), rounds=3, iterations=1)
    benchmark.extra_info.update(inspect_s=res["wall_s"], inspect_rss_mib=round(res["peak_rss_mib"]),
                                import_rss_mib=round(base["peak_rss_mib"]), inspect_read=res["read"])
    publish(f"\nsame shards as a Hugging Face folder, tiecheck.analyze(duplicates=False) (LlamaForCausalLM "
            f"built on meta from config.json): "
          f"{res['wall_s'] * 1e3:.0f} ms, peak RSS {res['peak_rss_mib']:.0f} MiB (imports incl. transformers "
          f"{base['peak_rss_mib']:.0f} MiB), read {res['read']:,} bytes")
    assert res["tensors"] == 32 * 9 + 3
    assert res["params"] == params
    assert res["groups"] == []
    assert res["read"] < header_bytes + (1 << 20)  # plus config.json and what transformers reads
