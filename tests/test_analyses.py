"""The pure analyses, on hand-made facts: no torch involved."""

from __future__ import annotations

import pytest

from tiecheck.analyses.candidates import find_candidates
from tiecheck.analyses.duplicates import find_untied_duplicates
from tiecheck.analyses.expect import TieState, tied_findings
from tiecheck.analyses.lint import linear_shape_findings
from tiecheck.analyses.memory import memory_summary, training_bytes_per_element
from tiecheck.analyses.ties import (
    DISTINCT_PARAMETERS,
    RESTRIDED_ALIAS,
    SAME_PARAMETER,
    SHARED_STORAGE,
    TRANSPOSED_ALIAS,
    find_overlaps,
    find_tie_groups,
    tie_findings,
)
from tiecheck.facts import ModuleFact, TensorFact, span_elements

S = ("cpu", 0x1000)  # one storage
T = ("cpu", 0x9000)  # another


def fact(name, shape, stride=None, storage=S, offset=0, itemsize=4, obj=None, role="tensor", dtype="float32",
         owner_type=None, device="cpu", requires_grad=True):
    if stride is None:
        stride, acc = [], 1
        for n in reversed(shape):
            stride.insert(0, acc)
            acc *= n
    span = span_elements(shape, stride)
    return TensorFact(name=name, shape=tuple(shape), stride=tuple(stride), dtype=dtype, itemsize=itemsize,
                      device=device, storage=storage, byte_start=offset * itemsize,
                      byte_end=(offset + span) * itemsize if storage else 0, obj_id=obj, role=role,
                      owner=name.rsplit(".", 1)[0] if "." in name else "", owner_type=owner_type,
                      requires_grad=requires_grad)


def test_same_parameter_is_a_true_tie():
    facts = [fact("emb.weight", (10, 4), obj=1, role="parameter"), fact("head.weight", (10, 4), obj=1, role="parameter")]
    (g,) = find_tie_groups(facts)
    assert g.names == ("emb.weight", "head.weight")
    assert g.kind == SAME_PARAMETER
    assert g.bytes_saved == 160
    assert tie_findings([g], []) == []


def test_file_alias_is_shared_storage():
    (g,) = find_tie_groups([fact("b", (10, 4)), fact("a", (10, 4))])
    assert g.kind == SHARED_STORAGE
    assert g.names == ("a", "b")


def test_distinct_parameters_over_one_memory_is_an_error():
    facts = [fact("a", (10, 4), obj=1, role="parameter"), fact("b", (10, 4), obj=2, role="parameter")]
    (g,) = find_tie_groups(facts)
    assert g.kind == DISTINCT_PARAMETERS
    (f,) = tie_findings([g], [])
    assert f.code == "TC002"
    assert f.severity == "error"


def test_transposed_and_restrided_aliases():
    groups = find_tie_groups([fact("w", (10, 4)), fact("wt", (4, 10), stride=(1, 4))])
    assert groups[0].kind == TRANSPOSED_ALIAS
    groups = find_tie_groups([fact("w", (10, 4)), fact("flat", (40,))])
    assert groups[0].kind == RESTRIDED_ALIAS
    assert [f.code for f in tie_findings(groups, [])] == ["TC008"]


def test_disjoint_views_of_one_buffer_are_not_ties():
    facts = [fact("q", (4, 4), offset=0), fact("k", (4, 4), offset=16), fact("v", (4, 4), offset=32)]
    assert find_tie_groups(facts) == []
    assert find_overlaps(facts) == []


def test_interleaved_column_slices_are_not_overlaps():
    # Columns of a (4, 12) matrix: byte ranges intersect, elements never do.
    facts = [fact("q", (4, 4), stride=(12, 1), offset=0), fact("k", (4, 4), stride=(12, 1), offset=4)]
    assert find_overlaps(facts) == []


def test_nested_view_and_partial_overlap():
    nested = find_overlaps([fact("flat", (64,)), fact("part", (4, 4), offset=8)])
    assert [o.kind for o in nested] == ["nested"]
    partial = find_overlaps([fact("a", (16,)), fact("b", (16,), offset=8)])
    assert [o.kind for o in partial] == ["partial"]
    codes = [f.code for f in tie_findings([], nested + partial)]
    assert codes == ["TC007", "TC003"]


def test_meta_device_uses_object_identity():
    facts = [fact("a", (10, 4), storage=None, obj=7, role="parameter", device="meta"),
             fact("b", (10, 4), storage=None, obj=7, role="parameter", device="meta"),
             fact("c", (10, 4), storage=None, obj=8, role="parameter", device="meta")]
    (g,) = find_tie_groups(facts)
    assert g.names == ("a", "b")
    assert g.kind == SAME_PARAMETER


def test_empty_tensors_never_tie():
    assert find_tie_groups([fact("a", (0, 4)), fact("b", (0, 4))]) == []


def test_memory_counts_once_and_per_name():
    facts = [fact("emb.weight", (100, 8), obj=1, role="parameter"),
             fact("head.weight", (100, 8), obj=1, role="parameter"),
             fact("ln.weight", (8,), storage=T, obj=2, role="parameter")]
    groups = find_tie_groups(facts)
    m = memory_summary(facts, groups, "adamw")
    assert m.params_unique == 808
    assert m.params_counted == 1608
    assert m.bytes_saved == 800 * 4
    assert m.training_bytes_saved == 800 * 16
    assert m.training_bytes == 808 * 16


def test_memory_distinct_parameters_share_weights_not_training_state():
    facts = [fact("a", (10, 10), obj=1, role="parameter"), fact("b", (10, 10), obj=2, role="parameter")]
    m = memory_summary(facts, find_tie_groups(facts), "adamw")
    assert m.bytes_saved == 400
    assert m.training_bytes_saved == 400  # weight bytes only: two gradients, two optimizer states


def test_memory_nested_views_count_once():
    facts = [fact("flat", (64,), obj=1, role="buffer"), fact("a", (4, 4), offset=0, obj=2, role="parameter"),
             fact("b", (4, 4), offset=16, obj=3, role="parameter")]
    m = memory_summary(facts, [], "none")
    assert m.bytes_unique == 64 * 4
    assert m.bytes_counted == 96 * 4


def test_training_bytes_per_element():
    assert training_bytes_per_element(4, "adamw") == 16
    assert training_bytes_per_element(2, "adamw") == 16  # bf16 + fp32 master + fp32 moments
    assert training_bytes_per_element(4, "sgd") == 12
    assert training_bytes_per_element(4, "none") == 8
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        training_bytes_per_element(4, "lion")


class DictReader:
    """A ContentReader over plain bytes, counting what it reads."""

    def __init__(self, data):
        self.data = data
        self.bytes_read = 0

    def sample(self, name):
        self.bytes_read += 2
        return self.data[name][:1] + self.data[name][-1:]

    def is_constant(self, name):
        return len(set(self.data[name])) == 1

    def equal(self, a, b):
        self.bytes_read += len(self.data[a]) + len(self.data[b])
        return self.data[a] == self.data[b]


def test_duplicates_sample_first_and_compare_only_collisions():
    facts = [fact(n, (4,), storage=("cpu", i + 1)) for i, n in enumerate(["a", "b", "c", "d"])]
    facts.append(fact("other_shape", (5,), storage=("cpu", 99)))
    reader = DictReader({"a": b"xyzw", "b": b"xqqw", "c": b"xyzw", "d": b"kkkk", "other_shape": b"xyzwx"})
    groups, stats = find_untied_duplicates(facts, reader)
    assert [g.names for g in groups] == [("a", "c")]
    assert stats.full_comparisons == 2  # a-b and a-c share samples; d never compared
    assert stats.buckets == 1


def test_duplicates_skip_tied_names_and_flag_constants():
    facts = [fact("a", (4,), storage=("cpu", 1)), fact("a2", (4,), storage=("cpu", 1)),
             fact("b", (4,), storage=("cpu", 2))]
    reader = DictReader({"a": b"\x01\x01\x01\x01", "b": b"\x01\x01\x01\x01"})
    (g,) = find_untied_duplicates(facts, reader)[0]
    assert g.names == ("a", "b")
    assert g.aliases == (("a", "a2"), ("b",))
    assert g.constant


def test_candidates_embedding_and_head():
    facts = [fact("model.embed_tokens.weight", (100, 8), storage=("cpu", 1), owner_type="Embedding"),
             fact("lm_head.weight", (100, 8), storage=("cpu", 2), owner_type="Linear"),
             fact("model.layers.0.mlp.weight", (100, 8), storage=("cpu", 3), owner_type="Linear")]
    (c,) = find_candidates(facts)
    assert c.names == ("lm_head.weight", "model.embed_tokens.weight")
    assert c.relation == "embedding-output"
    assert c.bytes_saved == 3200


def test_candidates_ignore_tied_and_position_embeddings():
    facts = [fact("wte.weight", (64, 8), storage=("cpu", 1)), fact("lm_head.weight", (64, 8), storage=("cpu", 1)),
             fact("wpe.weight", (64, 8), storage=("cpu", 2))]
    assert find_candidates(facts) == []


def test_candidates_source_and_target_embeddings():
    facts = [fact("src_embed.weight", (50, 8), storage=("cpu", 1), owner_type="Embedding"),
             fact("tgt_embed.weight", (50, 8), storage=("cpu", 2), owner_type="Embedding")]
    (c,) = find_candidates(facts)
    assert c.relation == "embeddings"


def test_wrong_linear_lint_from_module_facts():
    facts = [fact("emb.weight", (100, 16), obj=1, role="parameter", owner_type="Embedding"),
             fact("out.weight", (100, 16), obj=1, role="parameter", owner_type="Linear"),
             fact("out.bias", (16,), storage=T, obj=2, role="parameter", owner_type="Linear")]
    modules = {"out": ModuleFact("out", "Linear", (("in_features", 100), ("out_features", 16)))}
    (f,) = linear_shape_findings(facts, modules, find_tie_groups(facts))
    assert f.code == "TC001"
    assert "in_features=100" in f.message
    assert "cannot broadcast" in f.message
    assert f.names == ("out.bias", "out.weight")


def test_good_linear_has_no_lint():
    facts = [fact("out.weight", (100, 16)), fact("out.bias", (100,), storage=T)]
    modules = {"out": ModuleFact("out", "Linear", (("in_features", 16), ("out_features", 100)))}
    assert linear_shape_findings(facts, modules, []) == []


def test_expectations():
    facts = [fact("a", (4,), obj=1, role="parameter"), fact("b", (4,), obj=1, role="parameter"),
             fact("c", (4,), storage=T)]
    state = TieState.build(find_tie_groups(facts), [f.name for f in facts])
    assert tied_findings(state, [("a", "b")]) == []
    (f,) = tied_findings(state, [("a", "c")])
    assert f.code == "TC009"
    assert "c shares memory with nothing" in f.message
    assert "a shares memory with b" in f.message
    (f,) = tied_findings(state, [("a", "zzz")])
    assert "zzz is not in the target" in f.message


def test_memory_strided_view_inside_a_buffer_counts_once():
    # A (48, 16) weight, its first 16 rows, and a column slice: 768 elements of memory.
    facts = [fact("qkv.weight", (48, 16)), fact("q", (16, 16)), fact("col", (48, 4), stride=(16, 1))]
    m = memory_summary(facts, find_tie_groups(facts), "adamw")
    assert m.params_unique == 768
    assert m.bytes_unique == 768 * 4
    assert m.params_counted == 768 + 256 + 192
    # In a file the views are part of one parameter: training state once, like the weights.
    assert m.training_bytes == 768 * 16
    # Views are not ties: what a per-name sum counts twice for them is a figure of its own.
    assert m.training_bytes_saved == 0
    assert m.training_bytes_nested_views == (256 + 192) * 16
