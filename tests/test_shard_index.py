"""A weights index whose entries are not shard names, or name a shard that is not there."""

from __future__ import annotations

import json

import pytest
import torch

import tiecheck
from tiecheck.errors import TargetError

from support.checkpoints import write_safetensors


def _index(tmp_path, shard) -> str:
    write_safetensors(tmp_path / "model-1.safetensors", {"a.weight": torch.ones(2)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "model-1.safetensors", "b.weight": shard}}))
    return str(index)


@pytest.mark.parametrize("shard", [3, "", None, ["model-1.safetensors"]])
def test_a_weight_map_value_that_is_not_a_name_is_refused(tmp_path, shard):
    index = _index(tmp_path, shard)
    with pytest.raises(TargetError) as e:
        tiecheck.analyze(index)
    assert str(e.value) == f"{index}: weight_map['b.weight'] is {shard!r}, not a shard file name"


def test_a_missing_shard_is_named(tmp_path):
    index = _index(tmp_path, "model-2.safetensors")
    with pytest.raises(TargetError) as e:
        tiecheck.analyze(index)
    assert str(e.value) == (f"{index}: shard 'model-2.safetensors' named by the index is missing from {tmp_path} "
                            f"(partial download?); fetch it and retry")
