"""The lines a weights index gets when shards are missing or do not hold what it places in them:
how many are missing, and how many tensors they hold, counted from the index."""

from __future__ import annotations

import json

import pytest
import torch

import tiecheck
from tiecheck.errors import TargetError

from support.checkpoints import write_safetensors


def _index(tmp_path, weight_map: dict) -> str:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return str(index)


def _refusal(index: str) -> str:
    with pytest.raises(TargetError) as e:
        tiecheck.analyze(index)
    return str(e.value)


def test_two_missing_shards_are_counted_with_their_tensors(tmp_path):
    write_safetensors(tmp_path / "s1.safetensors", {"a": torch.ones(2)})
    index = _index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors",
                              "d": "s3.safetensors"})
    assert _refusal(index) == (f"{index}: shard 's2.safetensors' named by the index is missing from {tmp_path} "
                            f"(2 of the 3 shards are missing, holding 3 tensors) (partial download?); fetch it "
                            f"and retry")


def test_one_missing_shard_is_named_without_a_count(tmp_path):
    write_safetensors(tmp_path / "s1.safetensors", {"a": torch.ones(2)})
    index = _index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    assert _refusal(index) == (f"{index}: shard 's2.safetensors' named by the index is missing from {tmp_path} "
                            f"(partial download?); fetch it and retry")


def test_a_shard_that_does_not_hold_what_the_index_places_in_it(tmp_path):
    write_safetensors(tmp_path / "s1.safetensors", {"a": torch.ones(2)})
    index = _index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    assert _refusal(index) == (f"{index}: the index places 'b' in s1.safetensors, which does not hold it; the index "
                            f"and shards disagree")
