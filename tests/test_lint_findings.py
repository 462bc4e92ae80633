"""TC001 on a file, where no module types say what a 2-D weight is: the Conv1D layout rule.

Planted mutations of ``linear_shape_findings`` survived the rest of the suite on these lines: a
bias matching the weight's *columns* is GPT-2's Conv1D (in, out) layout and no finding, unless
the weight is tied to another tensor (then it is a Linear stored (out, in) and the bias is wrong),
and the message names the tie only when there is one.
"""

from __future__ import annotations

from tiecheck.analyses.lint import linear_shape_findings
from tiecheck.analyses.ties import find_tie_groups
from tiecheck.facts import ModuleFact, TensorFact, span_elements


def fact(name: str, shape: tuple[int, ...], storage: tuple[str, int]) -> TensorFact:
    """A contiguous float32 tensor at offset 0 of ``storage``, as a file loader reports it."""
    stride, acc = [], 1
    for n in reversed(shape):
        stride.insert(0, acc)
        acc *= n
    span = span_elements(shape, stride)
    return TensorFact(name=name, shape=shape, stride=tuple(stride), dtype="float32", itemsize=4, device="cpu",
                      storage=storage, byte_start=0, byte_end=span * 4, obj_id=None, role="tensor",
                      owner=name.rsplit(".", 1)[0], owner_type=None, requires_grad=False)


def test_conv1d_layout_in_a_file_is_not_a_broken_linear():
    # (in=8, out=32) weight with a 32-entry bias: the bias matches the columns, as Conv1D stores it.
    facts = [fact("h.c_fc.weight", (8, 32), ("cpu", 1)), fact("h.c_fc.bias", (32,), ("cpu", 2))]
    assert linear_shape_findings(facts, {}, find_tie_groups(facts)) == []


def test_a_bias_matching_neither_side_in_a_file_is_flagged_without_a_tie():
    facts = [fact("out.weight", (100, 16), ("cpu", 1)), fact("out.bias", (7,), ("cpu", 2))]
    (f,) = linear_shape_findings(facts, {}, find_tie_groups(facts))
    assert f.code == "TC001"
    assert f.message == "out: its bias has 7 entries but the output has 100, so the bias cannot broadcast"
    assert f.names == ("out.bias", "out.weight")


def test_a_tied_weight_with_a_column_sized_bias_is_a_broken_linear():
    # The head shares the embedding's storage (a file alias): it is (out=100, in=16), so a 16-entry
    # bias cannot be the Conv1D layout; it is the snippet's d_model-sized bias.
    facts = [fact("emb.weight", (100, 16), ("cpu", 1)), fact("out.weight", (100, 16), ("cpu", 1)),
             fact("out.bias", (16,), ("cpu", 2))]
    (f,) = linear_shape_findings(facts, {}, find_tie_groups(facts))
    assert f.message == ("out (weight tied with emb.weight): its bias has 16 entries but the output has 100, "
                         "so the bias cannot broadcast")
    assert f.names == ("out.bias", "out.weight")


def test_with_module_types_a_column_sized_bias_is_flagged_even_untied():
    # Module facts say it is a Linear: the Conv1D excuse applies to files only.
    facts = [fact("out.weight", (8, 32), ("cpu", 1)), fact("out.bias", (32,), ("cpu", 2))]
    modules = {"out": ModuleFact("out", "Linear", (("in_features", 32), ("out_features", 8)))}
    (f,) = linear_shape_findings(facts, modules, find_tie_groups(facts))
    assert f.message == "out: its bias has 32 entries but the output has 8, so the bias cannot broadcast"


def test_one_dimensional_weights_in_a_file_are_not_linears():
    # A LayerNorm's weight and bias: a 1-D "weight" is skipped before any column is looked at.
    facts = [fact("ln.weight", (16,), ("cpu", 1)), fact("ln.bias", (16,), ("cpu", 2))]
    assert linear_shape_findings(facts, {}, find_tie_groups(facts)) == []
