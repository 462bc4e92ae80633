"""Tie candidates by role: names alone in a file, module types in a live model, and what a config declares."""

from __future__ import annotations

import math

import pytest

from tiecheck.analyses.candidates import find_candidates, is_embedding, must_tie_pairs
from tiecheck.facts import TensorFact


def _fact(name: str, shape: tuple[int, ...], storage: int, owner_type: str | None = None) -> TensorFact:
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return TensorFact(name=name, shape=shape, stride=stride, dtype="float32", itemsize=4, device="cpu",
                      storage=("cpu", storage), byte_start=0, byte_end=4 * math.prod(shape),
                      owner=name.rsplit(".", 1)[0] if "." in name else "", owner_type=owner_type)


def test_file_names_alone_find_the_embedding_and_head():
    # A checkpoint file: no module types, the roles come from the conventional names.
    facts = [_fact("model.embed_tokens.weight", (32, 4), 1), _fact("lm_head.weight", (32, 4), 2)]
    assert is_embedding(facts[0]) is True
    (c,) = find_candidates(facts)
    assert (c.names, c.relation, c.bytes_saved) == (("lm_head.weight", "model.embed_tokens.weight"),
                                                    "embedding-output", 512)


@pytest.mark.parametrize("name", ["transformer.wpe.weight", "embeddings.position_embeddings.weight",
                                  "embeddings.token_type_embeddings.weight"])
def test_position_and_type_embeddings_are_not_token_embeddings(name):
    # An Embedding module, but a position or token-type table: never tied to the output projection.
    f = _fact(name, (32, 4), 1, owner_type="Embedding")
    assert is_embedding(f) is False
    assert find_candidates([f, _fact("lm_head.weight", (32, 4), 2, owner_type="Linear")]) == []


@pytest.mark.parametrize(("name", "shape"), [("embed.bias", (32, 4)), ("embed.weight", (32,)),
                                             ("embed.weight", (2, 32, 4))])
def test_an_embedding_is_a_two_dimensional_weight(name, shape):
    assert is_embedding(_fact(name, shape, 1, owner_type="Embedding")) is False
    assert is_embedding(_fact("embed.weight", (32, 4), 1, owner_type="Embedding")) is True


def test_config_untied_on_purpose_declares_no_pair():
    cands = find_candidates([_fact("wte.weight", (32, 4), 1), _fact("lm_head.weight", (32, 4), 2),
                             _fact("src_embed.weight", (32, 4), 3)])
    assert sorted(c.relation for c in cands) == ["embedding-output", "embedding-output", "embeddings"]
    assert must_tie_pairs(cands, False) == []
    expected = [("lm_head.weight", "src_embed.weight"), ("lm_head.weight", "wte.weight")]
    assert sorted(must_tie_pairs(cands, True)) == expected
    assert sorted(must_tie_pairs(cands, None)) == expected
