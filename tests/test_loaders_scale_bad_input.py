"""Bad input at scale: each is one clear line (or a count) quickly, never a hang or a memory blow-up."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli.main import main
from tiecheck.errors import TargetError
from tiecheck.flops import count_flops

MAX_HEADER = 100_000_000


def test_safetensors_header_claiming_ten_million_tensors(tmp_path):
    # ~56 header bytes per tensor entry: a 10M-tensor header would be 560 MB; the file is 64 bytes
    path = tmp_path / "huge-header.safetensors"
    path.write_bytes((10_000_000 * 56).to_bytes(8, "little") + b"{" + b" " * 55)
    with pytest.raises(TargetError, match=f"header length 560,000,000 bytes exceeds the {MAX_HEADER:,}-byte limit"):
        tiecheck.analyze(str(path))
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tiecheck: error: ")
    assert "560,000,000" in lines[0]


def test_header_within_the_limit_but_longer_than_the_file(tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes((MAX_HEADER - 1).to_bytes(8, "little") + b'{"a":')
    with pytest.raises(TargetError, match=r"exceeds the file size .* truncated or corrupt"):
        tiecheck.analyze(str(path))


def test_index_naming_a_million_tensors_across_missing_shards(tmp_path):
    n, shards = 1_000_000, 1000
    body = ",".join(f'"layers.{i}.w":"model-{i % shards:05d}-of-{shards:05d}.safetensors"' for i in range(n))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata":{},"weight_map":{' + body + "}}")
    with pytest.raises(TargetError) as e:
        tiecheck.analyze(str(index))
    msg = str(e.value)
    assert "\n" not in msg
    assert "shard 'model-00000-of-01000.safetensors' named by the index is missing" in msg
    assert "(1,000 of the 1,000 shards are missing, holding 1,000,000 tensors)" in msg


def test_index_with_one_missing_shard_of_many(tmp_path):
    torch.manual_seed(0)
    from safetensors.torch import save_file  # noqa: PLC0415 - the writer, for this fixture only

    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    wm = {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(TargetError, match=r"shard 's2.safetensors' named by the index is missing from .* \(partial"):
        tiecheck.analyze(str(index))


def test_config_with_a_hundred_thousand_experts_counts_on_meta():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=1000, num_local_experts=100_000,
                                     num_experts_per_tok=2)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    t = 8
    r = count_flops(model, seq_len=t)
    assert r.available, r.reason
    assert r.by_part["router"] == 2 * 2 * t * 64 * 100_000
    assert r.by_part["experts"] == 2 * 2 * t * 2 * 3 * 64 * 128
    p = r.parameters
    routed = 2 * 100_000 * 3 * 64 * 128
    assert p["routed_experts"] == routed
    assert p["active_per_token"] == p["total"] - routed + 2 * (100_000 * 3 * 64 * 128) * 2 // 100_000
