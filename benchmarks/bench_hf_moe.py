"""Matching a per-expert mixture-of-experts folder to its architecture as transformers 5 loads it.

Run: pytest benchmarks/bench_hf_moe.py --benchmark-only -s

transformers 5 saves a Qwen3-MoE model one tensor per expert and builds it with one fused tensor per
layer; tiecheck asks transformers' own ``rename_source_key`` where each file key goes
(``tiecheck.loaders.hf_reconcile.key_map``). That is one call per key the plain name match leaves over,
so its cost grows with the number of experts. Two folders, 64 and 128 experts in each of 32 layers
(6,434 and 12,578 tensors, tiny shapes), each measured in a fresh interpreter (imports, transformers
included, are setup):

* ``key_map`` alone, on the architecture already built: its first call (what ``inspect`` pays,
  one-time set-up in transformers included) and the best of three (the per-key cost);
* ``tiecheck.analyze(path, flops=False, duplicates=False)`` whole, in the same run (the best of three
  fresh interpreters): the baseline the key map is a share of.
"""

from __future__ import annotations

import pytest
from conftest import run_child

LAYERS = 32

SETUP = ("import json, pathlib, time, tiecheck, tiecheck.api, tiecheck.loaders.hf_architecture as arch, tiecheck.loaders.hf_reconcile as rec, transformers\n"
         "from transformers.models.qwen3_moe import modeling_qwen3_moe\n"
         "from transformers import conversion_mapping, core_model_loading\n")
KEY_MAP = ("_p = pathlib.Path({path!r}); _cfg = json.loads((_p / 'config.json').read_text())\n"
           "from safetensors import safe_open\n"
           "with safe_open(str(_p / 'model.safetensors'), 'pt') as _f: _keys = list(_f.keys())\n"
           "_arch, _ = arch.build_architecture(_p, _cfg, stored=len(_keys))\n"
           "_ts = []\n"
           "for _ in range(3):\n"
           "    _t = time.perf_counter(); _km = rec.key_map(_keys, _arch); _ts.append(time.perf_counter() - _t)\n"
           "_out['key_map_first_s'] = _ts[0]; _out['key_map_s'] = min(_ts)\n"
           "_out['keys'] = len(_keys); _out['converted'] = len(_km.converted)")
ANALYZE = ("_r = tiecheck.analyze({path!r}, flops=False, duplicates=False)\n"
           "_out['unexpected'] = len(_r.to_dict()['hf']['architecture']['unexpected'])")


@pytest.fixture(scope="session")
def moe_folders(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.conversion_mapping")
    out = {}
    for experts in (64, 128):
        cfg = transformers.AutoConfig.for_model(
            "qwen3_moe", vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
            num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            num_experts=experts, num_experts_per_tok=2, tie_word_embeddings=True)
        d = tmp_path_factory.mktemp("moe") / f"experts-{experts}"
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        out[experts] = d
    return out


@pytest.mark.parametrize("experts", [64, 128])
def test_key_map_share_of_inspect(benchmark, moe_folders, publish, experts):
    path = str(moe_folders[experts])
    keyed = run_child(KEY_MAP.format(path=path), setup=SETUP)
    runs = []
    benchmark.pedantic(lambda: runs.append(run_child(ANALYZE.format(path=path), setup=SETUP)), rounds=3, iterations=1)
    whole = min(runs, key=lambda r: r["wall_s"])
    first, best = keyed["key_map_first_s"], keyed["key_map_s"]
    benchmark.extra_info.update(keys=keyed["keys"], key_map_first_s=first, key_map_s=best, analyze_s=whole["wall_s"])
    publish(f"\n{experts} experts x {LAYERS} layers: {keyed['keys']:,} file keys, {keyed['converted']:,} merged on "
            f"load | key_map first call {first * 1e3:.0f} ms, best of 3 {best * 1e3:.0f} ms "
            f"({best / keyed['keys'] * 1e6:.1f} us a key) | tiecheck.analyze(flops=False, duplicates=False) "
            f"{whole['wall_s'] * 1e3:.0f} ms, peak RSS {whole['peak_rss_mib']:.0f} MiB | first call's share "
            f"{first / whole['wall_s']:.2f}")
    assert keyed["converted"] == LAYERS * experts * 3
    assert whole["unexpected"] == 0
