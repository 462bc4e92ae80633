"""TC001 with module types (a live model): which modules are linted, and the bias shapes that are flagged."""

from __future__ import annotations

import math

from tiecheck.analyses.lint import linear_shape_findings
from tiecheck.facts import ModuleFact, TensorFact


def _fact(name: str, shape: tuple[int, ...], storage: int) -> TensorFact:
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return TensorFact(name=name, shape=shape, stride=stride, dtype="float32", itemsize=4, device="cpu",
                      storage=("cpu", storage), byte_start=0, byte_end=4 * math.prod(shape), obj_id=storage,
                      role="parameter", owner=name.rsplit(".", 1)[0])


def _linear(path: str, in_features: int, out_features: int) -> ModuleFact:
    return ModuleFact(path=path, type="Linear", attrs=(("in_features", in_features), ("out_features", out_features)))


def test_a_linear_without_bias_whose_weight_disagrees():
    facts = [_fact("proj.weight", (8, 5), 1)]
    (f,) = linear_shape_findings(facts, {"proj": _linear("proj", 4, 8)}, [])
    assert f.message == "proj: it is declared nn.Linear(in_features=4, out_features=8) but its weight is [8, 5]"
    assert f.names == ("proj.weight",)


def test_a_two_dimensional_bias():
    facts = [_fact("proj.weight", (8, 4), 1), _fact("proj.bias", (8, 1), 2)]
    (f,) = linear_shape_findings(facts, {"proj": _linear("proj", 4, 8)}, [])
    assert f.message == "proj: its bias has shape [8, 1]"


def test_modules_that_are_not_linears_are_not_linted():
    # GPT-2's Conv1D stores (in, out) with an out-sized bias; a module without a fact is not judged either.
    facts = [_fact("h.c_fc.weight", (8, 32), 1), _fact("h.c_fc.bias", (32,), 2),
             _fact("orphan.weight", (8, 4), 3), _fact("orphan.bias", (3,), 4)]
    modules = {"h.c_fc": ModuleFact(path="h.c_fc", type="Conv1D")}
    assert linear_shape_findings(facts, modules, []) == []
    # The same tensors with a Linear fact are flagged: the skip above is the module type's doing.
    (f,) = linear_shape_findings(facts, {"h.c_fc": _linear("h.c_fc", 32, 8)}, [])
    assert f.message == "h.c_fc: its bias has 32 entries but the output has 8, so the bias cannot broadcast"
