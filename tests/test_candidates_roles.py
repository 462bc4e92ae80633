"""Tie candidates by role: names alone in a file, module types in a live model, and what a config declares."""

from __future__ import annotations

import math

import pytest

from tiecheck import facts
from tiecheck.analyses.candidates import (
    candidate_findings,
    find_candidates,
    is_embedding,
    is_output_projection,
    role_relations,
)
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

    def broken(tie):
        return sorted(r.names for r in role_relations(cands, tie) if r.broken)

    assert broken(False) == []
    expected = [("lm_head.weight", "src_embed.weight"), ("lm_head.weight", "wte.weight")]
    assert broken(True) == expected
    assert broken(None) == expected
    # Untied on purpose, the pairs are still related: a copy between them is a warning, not a broken tie.
    assert sorted(r.names for r in role_relations(cands, False)) == sorted(c.names for c in cands)


@pytest.mark.parametrize(("name", "shape", "owner_type", "expected"), [
    ("lm_head.weight", (32, 4), None, True),  # a file: the name decides
    ("lm_head.weight", (32, 4), "Linear", True),
    ("lm_head.weight", (32, 4), "Linear8bitLt", True),  # a quantized Linear
    ("lm_head.weight", (32, 4), "Conv1d", False),  # a head name on another module type
    ("lm_head.weight", (32,), None, False),  # not a matrix
    ("model.layers.0.mlp.weight", (32, 4), None, False),  # not a head name
    ("lm_head.bias", (32, 4), None, False),
])
def test_output_projection_role(name, shape, owner_type, expected):
    assert is_output_projection(_fact(name, shape, 1, owner_type=owner_type)) is expected


@pytest.mark.parametrize(("name", "owner_type", "expected"), [
    ("model.embed_tokens.weight", "Embedding", True),
    ("model.embed_tokens.weight", "VocabParallelEmbedding", True),  # an Embedding subclass, a token-embedding name
    ("model.embed_tokens.weight", "Linear", False),  # the name alone does not make a Linear an embedding
    ("model.lookup.weight", "Embedding", True),  # the module type alone does
    ("model.lookup.weight", "VocabParallelEmbedding", False),  # a look-alike type needs the name as well
])
def test_embedding_role_in_a_live_model(name, owner_type, expected):
    assert is_embedding(_fact(name, (32, 4), 1, owner_type=owner_type)) is expected


def test_candidate_finding_names_both_tensors():
    (f,) = candidate_findings(find_candidates([_fact("wte.weight", (32, 4), 1), _fact("lm_head.weight", (32, 4), 2)]))
    assert f.code == "TC006"
    assert f.message == ("lm_head.weight and wte.weight (input embedding and output projection, [32, 4] float32) "
                         "are untied; tying them would save 512 bytes of weights")
    assert candidate_findings(find_candidates([_fact("wte.weight", (32, 4), 1), _fact("lm_head.weight", (32, 4), 2)]),
                              reported=[("lm_head.weight", "wte.weight")]) == []


@pytest.mark.parametrize("name", [
    "model.embed_tokens.weight", "transformer.w.weight", "x.w.weight", "shared.weight", "weight", "embedding.weight",
    "lm_head.weight", "cls.predictions.pred_layer.proj.weight", "model.lm_head.out_proj.weight", "a.out_proj.weight",
    "decoder.weight", "layers.0.mlp.w.weight", "model.layers.3.mlp.experts.7.w1.weight", "wte.weight", "wpe.weight",
])
@pytest.mark.parametrize("owner_type", [None, "Embedding", "Linear", "ParametrizedEmbedding"])
def test_the_last_part_prefilter_agrees_with_the_patterns(name, owner_type):
    # The set lookup that turns names away before a pattern is searched must never turn one away
    # that the pattern alone would accept.
    f = _fact(name, (32, 4), 1, owner_type=owner_type)
    owner_last = f.owner.rsplit(".", 1)[-1]
    embed = (f.attr == "weight" and not facts._NOT_TOKEN_EMBED.search(owner_last or "")
             and (owner_type == "Embedding" or bool(facts._EMBED_NAME.search(name)
                                                    and (owner_type is None or "Embedding" in owner_type))))
    head = bool(facts._HEAD_NAME.search(name)) and (owner_type is None or "Linear" in owner_type)
    assert (is_embedding(f), is_output_projection(f)) == (embed, head)
