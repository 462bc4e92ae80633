"""Sharded safetensors written by huggingface_hub keep a tie as an alias map per shard: read like a
single file's, with the kept tensor possibly in another shard."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import tiecheck
from tiecheck.errors import TiecheckError
from tiecheck.loaders.formats.sharded import stored_names
from tiecheck.runtime import TieLostWarning, saved_ties

hub = pytest.importorskip("huggingface_hub")


@pytest.fixture
def sharded(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 16, generator=g)
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb,
          "model.norm.weight": torch.ones(16), "model.layers.0.w": torch.randn(16, 16, generator=g)}
    hub.save_torch_state_dict(sd, tmp_path, max_shard_size=4096)  # several shards
    return tmp_path


def test_a_sharded_alias_map_is_a_declared_and_restored_tie(sharded):
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1
    r = tiecheck.analyze(str(sharded / "model.safetensors.index.json"))
    (group,) = r.tie_groups
    assert list(group.names) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert r.summary.bytes_saved == 64 * 16 * 4
    (decl,) = [d for d in r.declared.declarations if d.kind == "alias_map"]
    assert decl.file == "model.safetensors.index.json"
    assert not [f for f in r.findings if f.code in ("TC015", "TC017", "TC020")]


def test_stored_names_reads_every_shard_and_the_alias(sharded):
    names, aliases = stored_names(sharded)
    assert set(aliases.items()) == {("lm_head.weight", "model.embed_tokens.weight")} or \
        set(aliases.items()) == {("model.embed_tokens.weight", "lm_head.weight")}
    assert len(names) == 3  # one of the two tied names is dropped on save


def test_an_index_naming_a_shard_outside_the_folder_is_refused_not_followed(sharded):
    index = sharded / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    name = next(iter(raw["weight_map"]))
    raw["weight_map"][name] = "../elsewhere.safetensors"
    index.write_text(json.dumps(raw))
    with pytest.raises(TiecheckError, match="lies outside its folder"):
        stored_names(sharded)
    # During training the callback warns instead of stopping the run.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert saved_ties(sharded, ()) is None
    assert any(issubclass(w.category, TieLostWarning) and "cannot tell whether it keeps the ties" in str(w.message)
               for w in caught)
