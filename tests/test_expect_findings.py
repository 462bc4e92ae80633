"""The expectation findings' words: TC009, TC013 and TC014 say what each name shares now and why a
tie is likely missing, from the tie facts alone (``TieState``), as ``check``, ``analyze(expect_tied=...)``
and the pytest assertions all read them."""

from __future__ import annotations

import pytest

from tiecheck.analyses.expect import (
    ExpectedGroup,
    TieState,
    group_lines,
    kinds_match,
    not_tied_findings,
    snapshot_findings,
    tied_findings,
)

NAMES = frozenset({"emb.weight", "head.weight", "enc.weight", "dec.weight"})


def _state(groups=(), duplicates=(), content_known=True) -> TieState:
    return TieState(groups=tuple(groups), names=NAMES, duplicates=tuple(duplicates), content_known=content_known)


def test_a_missing_name_is_named_and_the_closest_one_offered():
    (f,) = tied_findings(_state(), [("emb.weight", "head.weigth")])
    assert f.code == "TC009"
    assert "head.weigth is not in the target (did you mean head.weight?)" in f.message
    assert f.hint.startswith("head.weigth is not in the target: check the names")
    (f,) = tied_findings(_state(), [("emb.weight", "x.bias", "y.bias")])
    assert f.hint.startswith("x.bias, y.bias are not in the target")


@pytest.mark.parametrize(("duplicates", "known", "hint"), [
    ([(("emb.weight", "head.weight"), False)], True, "they hold equal values in separate memory"),
    ([], True, "their values differ"),
    ([], False, "re-tie after load_state_dict(assign=True)"),
])
def test_the_hint_follows_what_the_values_say(duplicates, known, hint):
    (f,) = tied_findings(_state(duplicates=duplicates, content_known=known), [("emb.weight", "head.weight")])
    assert f.code == "TC009"
    assert f.hint.startswith(hint)
    assert "model.head.weight = model.emb.weight" in f.hint


def test_a_copy_is_described_as_equal_values_in_separate_memory():
    state = _state(duplicates=[(("emb.weight", "head.weight"), False)])
    (f,) = tied_findings(state, [("emb.weight", "head.weight")])
    assert "emb.weight shares memory with nothing (equal values to head.weight in separate memory)" in f.message


@pytest.mark.parametrize(("actual", "hint"), [
    ("distinct_parameters", "the names share memory through distinct Parameter objects"),
    ("transposed_alias", "one name now sees the memory with another shape or strides"),
    ("restrided_alias", "one name now sees the memory with another shape or strides"),
    ("view", None),
])
def test_a_tie_of_another_kind_says_what_the_kind_means(actual, hint):
    state = _state(groups=[(("emb.weight", "head.weight"), actual)])
    (f,) = tied_findings(state, [ExpectedGroup(("emb.weight", "head.weight"), "same_parameter")])
    assert f.code == "TC014"
    assert f.message == f"emb.weight, head.weight are tied as {actual}, expected same_parameter"
    if hint is None:  # the catalogue's own hint for TC014, not one of the kinds'
        assert "distinct Parameter" not in f.hint
        assert "another shape" not in f.hint
    else:
        assert f.hint.startswith(hint)


def test_a_file_shared_storage_meets_a_same_parameter_expectation():
    assert kinds_match("same_parameter", "shared_storage")
    assert kinds_match(None, "view")
    assert not kinds_match("same_parameter", "view")
    state = _state(groups=[(("emb.weight", "head.weight"), "shared_storage")])
    assert tied_findings(state, [ExpectedGroup(("emb.weight", "head.weight"), "same_parameter")]) == []


def test_a_snapshot_names_what_each_member_of_a_new_tie_had():
    state = _state(groups=[(("enc.weight", "head.weight"), "same_parameter")])
    expected = [ExpectedGroup(("emb.weight", "head.weight"), "same_parameter")]
    found = {f.code: f for f in snapshot_findings(state, expected)}
    assert set(found) == {"TC009", "TC013"}
    assert found["TC013"].message == ("enc.weight, head.weight share memory (same_parameter), which the snapshot "
                                      "does not expect: it has enc.weight not tied; head.weight tied to emb.weight")


def test_names_kept_apart_and_one_name_alone():
    state = _state(groups=[(("emb.weight", "head.weight"), "same_parameter")])
    (f,) = not_tied_findings(state, [("emb.weight", "head.weight", "enc.weight")])
    assert f.message == ("expected emb.weight, head.weight, enc.weight not to be tied: emb.weight, head.weight "
                         "share memory (same_parameter)")
    assert not_tied_findings(state, [("enc.weight",)]) == []
    assert len(not_tied_findings(state, [("head.weight",)])) == 1


def test_labels_and_group_lines():
    assert ExpectedGroup(("a", "b")).label() == "a, b"
    assert ExpectedGroup(("a", "b"), "view").label() == "a, b (view)"
    assert group_lines([(("a", "b"), None), (("c", "d"), "view")]) == ["[any kind] a, b", "[view] c, d"]
    assert group_lines([]) == ["(no tie groups)"]


def test_values_are_unknown_unless_the_content_pass_ran():
    """``content_known`` defaults to False both ways a state is made: no duplicate found then means
    nothing, and the hint does not claim the values differ."""
    pair = ["emb.weight", "head.weight"]
    assert TieState(groups=(), names=NAMES).equal_content(pair) is None
    assert TieState.build([], NAMES).equal_content(pair) is None
    assert TieState.build([], NAMES, content_known=True).equal_content(pair) is False


def test_names_of_one_memory_hold_equal_values():
    state = _state(groups=[(("emb.weight", "head.weight"), "same_parameter")])
    assert state.equal_content(["emb.weight"]) is True
    assert state.equal_content(["emb.weight", "head.weight"]) is True
    assert state.equal_content(["emb.weight", "enc.weight"]) is False
    (f,) = tied_findings(_state(), [("emb.weight", "emb.weight")])  # one name twice: one memory
    assert f.hint.startswith("they hold equal values in separate memory")


def test_expectations_given_as_generators_are_read_once():
    state = _state(groups=[(("emb.weight", "head.weight"), "same_parameter")])
    (f,) = not_tied_findings(state, [(n for n in ("emb.weight", "head.weight"))])
    assert f.names == ("emb.weight", "head.weight")
    assert f.message.startswith("expected emb.weight, head.weight not to be tied")


def test_expected_groups_and_states_are_values():
    """Frozen: a state read by several checks cannot be changed by one, and both can be set members."""
    group, state = ExpectedGroup(("a", "b"), "view"), _state()
    assert len({group, ExpectedGroup(("a", "b"), "view")}) == 1
    assert hash(state) == hash(_state())
    with pytest.raises(AttributeError):
        group.kind = None
    with pytest.raises(AttributeError):
        state.content_known = False


def test_a_tied_name_stands_for_its_memory_by_the_groups_first_name():
    """The duplicate pass lists one name per memory, the first of its tie group: a name tied under
    another name still finds its copy."""
    state = _state(groups=[(("emb.weight", "head.weight"), "same_parameter")],
                   duplicates=[(("emb.weight", "enc.weight"), False)])
    assert state.memory_of("head.weight") == "emb.weight"
    assert state.equal_content(["head.weight", "enc.weight"]) is True
    assert state.copies_of("head.weight") == ["enc.weight"]
    assert state.copies_of("dec.weight") == []  # a list either way, for callers that extend or index it
