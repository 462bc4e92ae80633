"""``may_have_role``, the prefilter the analyses ask of every tensor, never turns away a tensor that
``is_embedding`` or ``is_output_projection`` would call an embedding or a head.

Every alternative of both role patterns is tried as a whole module path, after a prefix, glued to a
longer word, and with every kind of owner, each in 2-D and 3-D: the prefilter may say yes where the
two say no (they decide), never the other way round.
"""

from __future__ import annotations

import itertools

import pytest

from tiecheck.facts import (
    _EMBED_ALTS,
    _HEAD_ALTS,
    TensorFact,
    is_embedding,
    is_output_projection,
    may_have_role,
)

ALTERNATIVES = sorted({a for alts in (*_EMBED_ALTS.values(), *_HEAD_ALTS.values()) for a in alts})
OWNER_TYPES = [None, "Embedding", "Linear", "QuantLinear", "ScaledWordEmbedding", "Conv1D", "LayerNorm"]


def _names(alt: str) -> list[str]:
    return [f"{alt}.weight", f"model.{alt}.weight", f"x{alt}.weight", f"model.{alt}x.weight",
            f"model.{alt}.bias", f"model.{alt}.weight.scale", alt, "weight", f"model.{alt}.{alt}.weight"]


def _fact(name: str, shape: tuple[int, ...], owner_type: str | None) -> TensorFact:
    return TensorFact(name=name, shape=shape, stride=tuple(1 for _ in shape), dtype="float32", itemsize=4,
                      device="cpu", owner=name.rpartition(".")[0], owner_type=owner_type)


@pytest.mark.parametrize("alt", ALTERNATIVES)
def test_never_false_where_a_role_holds(alt):
    held = 0
    for name, shape, owner in itertools.product(_names(alt), [(8, 4), (2, 8, 4)], OWNER_TYPES):
        f = _fact(name, shape, owner)
        if is_embedding(f) or is_output_projection(f):
            held += 1
            assert may_have_role(f), (name, shape, owner)
    assert held  # each alternative gives at least one embedding or head here: the check above ran


def test_expert_weights_have_no_role():
    """The names a mixture of experts stores by the hundred thousand: the prefilter turns them away,
    even where a module's last name part is one a role pattern ends with (CTRL's ``transformer.w``)."""
    for name in ["model.layers.0.mlp.experts.7.w.weight", "model.layers.3.mlp.experts.1.down_proj.weight",
                 "m.l.0.e.1.w"]:
        for owner in (None, "Linear"):
            assert not may_have_role(_fact(name, (8, 8), owner))
    assert may_have_role(_fact("transformer.w.weight", (8, 8), None))
    assert may_have_role(_fact("encoder.anything", (8, 8), "Embedding"))
