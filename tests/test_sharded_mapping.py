"""Sharded safetensors behind one mapping: facts read from the shards' headers equal those read from
the tensors, duplicates are found across shards, and a name stored twice is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiecheck
from tiecheck.errors import TargetError
from tiecheck.loaders import load_target
from tiecheck.loaders.detect import read_weights_index, sniff_file
from tiecheck.loaders.formats.sharded import ShardedTensors
from tiecheck.loaders.tensor_facts import build_facts, fact_of

from support.checkpoints import write_safetensors, write_sharded

FIELDS = ("name", "shape", "stride", "dtype", "itemsize", "device", "byte_start", "byte_end", "owner",
          "is_floating", "identity")


def _tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model.embed.weight": torch.randn(8, 4, generator=g), "model.norm.weight": torch.ones(4),
            "model.mask": torch.tensor([True, False]), "model.step": torch.tensor(3, dtype=torch.int64),
            "model.half.weight": torch.randn(3, 2, generator=g).to(torch.bfloat16),
            "model.empty": torch.zeros(0, 4)}


def test_facts_from_the_headers_equal_facts_from_the_tensors(tmp_path):
    index = write_sharded(tmp_path, _tensors(), shards=3)
    sub = load_target(str(index))
    assert isinstance(sub.tensors, ShardedTensors)
    ours = build_facts(sub)
    theirs = [fact_of(n, sub.tensors[n]) for n in sub.tensors]
    assert [f.name for f in ours] == list(sub.tensors)
    assert sorted(f.name for f in ours) == sorted(_tensors())
    assert [[getattr(f, k) for k in FIELDS] for f in ours] == [[getattr(f, k) for k in FIELDS] for f in theirs]
    # one storage per shard: three memories, never one
    assert len({f.storage for f in ours if f.storage is not None}) == 3


def test_alias_restored_across_shards_reads_as_the_kept_tensor(tmp_path):
    tensors = _tensors()
    index = write_sharded(tmp_path, tensors, shards=3)
    meta = json.loads(index.read_text())
    meta["metadata"]["lm_head.weight"] = "model.embed.weight"
    index.write_text(json.dumps(meta))
    sub = load_target(str(index))
    assert "lm_head.weight" in sub.tensors
    assert len(sub.tensors) == len(tensors) + 1
    assert torch.equal(sub.tensors["lm_head.weight"], tensors["model.embed.weight"])
    assert sub.tensors.file_layout("lm_head.weight") == sub.tensors.file_layout("model.embed.weight")
    r = tiecheck.analyze(str(index))
    assert [list(g.names) for g in r.tie_groups] == [["lm_head.weight", "model.embed.weight"]]


def test_duplicate_across_shards_is_found_by_reading_both_files(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    tensors = {"a.weight": w, "b.weight": torch.randn(64, 32, generator=g), "c.weight": w.clone()}
    index = write_sharded(tmp_path, tensors, shards=3)
    r = tiecheck.analyze(str(index))
    assert [list(d.names) for d in r.untied_duplicates] == [["a.weight", "c.weight"]]
    assert r.content.stats.bytes_read < 2 * 64 * 32 * 4 + 3 * 4 * 8 * 4 + 1  # the pair in full, samples of the rest


def test_a_name_stored_in_two_shards_is_one_line(tmp_path):
    write_safetensors(tmp_path / "s1.safetensors", {"a": torch.zeros(2), "b": torch.ones(2)})
    write_safetensors(tmp_path / "s2.safetensors", {"b": torch.ones(2), "c": torch.ones(3)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}))
    with pytest.raises(TargetError) as e:
        tiecheck.analyze(str(index))
    assert str(e.value) == f"{index}: tensor 'b' is stored in more than one shard"


def test_a_tensor_the_index_does_not_name_is_noted(tmp_path):
    write_safetensors(tmp_path / "s1.safetensors", {"a": torch.zeros(2), "extra": torch.ones(2)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    r = tiecheck.analyze(str(index))
    assert "1 tensor(s) in the shards are not in the index (e.g. extra); loaders that follow the index ignore " \
           "them" in r.source.notes


def test_safetensors_and_torch_save_shards_together(tmp_path):
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    write_safetensors(tmp_path / "s1.safetensors", {"a.weight": w})
    torch.save({"b.weight": w.clone(), "c.weight": torch.ones(5)}, tmp_path / "s2.bin")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.bin",
                                                "c.weight": "s2.bin"}}))
    sub = load_target(str(index))
    # A torch.save zip shard is read as records: both kinds sit behind one mapping.
    assert isinstance(sub.tensors, ShardedTensors)
    assert list(sub.tensors) == ["a.weight", "b.weight", "c.weight"]
    assert sub.tensors.facts() == [fact_of(n, t) for n, t in sub.tensors.items()]
    r = tiecheck.analyze(str(index))
    assert r.source.format == "sharded mixed"
    assert [list(d.names) for d in r.untied_duplicates] == [["a.weight", "b.weight"]]


def test_the_index_detection_parsed_is_handed_over_once(tmp_path):
    index = write_sharded(tmp_path, {"a": torch.zeros(2), "b": torch.ones(2)}, shards=2)
    assert sniff_file(Path(index)) == "weights index"
    first = read_weights_index(Path(index))
    first["weight_map"].clear()  # the caller owns it: the next read is not changed
    second = read_weights_index(Path(index))
    assert sorted(second["weight_map"]) == ["a", "b"]
    assert second is not first
