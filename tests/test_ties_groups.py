"""Tie groups on hand-made facts: the kinds a snapshot may hold, the layouts a group reports, and
empty tensors (which own no bytes) never forming a group."""

from __future__ import annotations

from tiecheck.analyses.ties import (
    KINDS,
    RESTRIDED_ALIAS,
    SHARED_STORAGE,
    TRANSPOSED_ALIAS,
    find_tie_groups,
    group_by_identity,
    tie_findings,
)
from tiecheck.facts import TensorFact

STORAGE = ("cpu", 4096)


def _fact(name: str, shape, stride, *, start: int = 0, end: int = 24, obj_id: int | None = None,
          storage=STORAGE) -> TensorFact:
    return TensorFact(name=name, shape=tuple(shape), stride=tuple(stride), dtype="float32", itemsize=4,
                      device="cpu", storage=storage, byte_start=start, byte_end=end, obj_id=obj_id)


def test_kinds_are_the_five_a_snapshot_accepts():
    assert KINDS == ("same_parameter", "shared_storage", "distinct_parameters", "transposed_alias",
                     "restrided_alias")


def test_layouts_are_reported_for_aliases_seen_in_another_layout():
    transposed = find_tie_groups([_fact("w", (2, 3), (3, 1)), _fact("w_t", (3, 2), (1, 3))])
    assert [g.kind for g in transposed] == [TRANSPOSED_ALIAS]
    assert transposed[0].to_dict()["layouts"] == [{"name": "w", "shape": [2, 3], "stride": [3, 1]},
                                                  {"name": "w_t", "shape": [3, 2], "stride": [1, 3]}]
    restrided = find_tie_groups([_fact("w", (2, 3), (3, 1)), _fact("flat", (6,), (1,))])
    assert [g.kind for g in restrided] == [RESTRIDED_ALIAS]
    assert restrided[0].to_dict()["layouts"] == [{"name": "flat", "shape": [6], "stride": [1]},
                                                 {"name": "w", "shape": [2, 3], "stride": [3, 1]}]
    shared = find_tie_groups([_fact("a", (2, 3), (3, 1)), _fact("b", (2, 3), (3, 1))])
    assert [g.kind for g in shared] == [SHARED_STORAGE]
    assert "layouts" not in shared[0].to_dict()


def test_empty_tensors_never_group_even_as_one_object():
    # One empty Parameter registered under two names, and two empty views of one storage.
    empty = [_fact("a", (0, 3), (3, 1), end=0, obj_id=7), _fact("b", (0, 3), (3, 1), end=0, obj_id=7),
             _fact("c", (0,), (1,), start=8, end=8), _fact("d", (0,), (1,), start=8, end=8)]
    assert group_by_identity(empty) == {}
    assert find_tie_groups(empty) == []
    assert find_tie_groups([*empty, _fact("x", (2, 3), (3, 1)), _fact("y", (2, 3), (3, 1))])[0].names == ("x", "y")


def test_a_group_takes_its_shape_from_its_first_fact_and_single_elements_tie():
    group = find_tie_groups([_fact("w", (2, 3), (3, 1)), _fact("w_t", (3, 2), (1, 3))])[0]
    assert (group.shape, group.numel) == ((2, 3), 6)
    one = find_tie_groups([_fact("s", (1,), (1,), end=4), _fact("t", (), (), end=4)])
    assert [(g.names, g.numel) for g in one] == [(("s", "t"), 1)]


def test_tc008_says_which_alias():
    transposed = find_tie_groups([_fact("w", (2, 3), (3, 1)), _fact("w_t", (3, 2), (1, 3))])
    restrided = find_tie_groups([_fact("w", (2, 3), (3, 1)), _fact("flat", (6,), (1,))])
    assert [f.message for f in tie_findings(transposed, [])] == \
        ["w [2, 3]; w_t [3, 2] share memory as the transpose of one another"]
    assert [f.message for f in tie_findings(restrided, [])] == \
        ["flat [6]; w [2, 3] share memory as different shapes or strides"]
