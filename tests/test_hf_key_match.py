"""``match_keys``: a checkpoint's keys against an architecture's, the base-model prefix added or
dropped for the whole checkpoint, and no architecture key claimed by two file keys."""

from __future__ import annotations

from tiecheck.loaders.hf_reconcile import match_keys


def test_keys_as_they_are_win_when_they_match():
    assert match_keys(["a.weight", "b.weight"], ["a.weight", "b.weight"], "model") == (
        {"a.weight": "a.weight", "b.weight": "b.weight"}, "")


def test_the_prefix_is_added_once_never_to_a_key_that_has_it():
    mapping, how = match_keys(["model.a", "b"], ["model.a", "model.b"], "model")
    assert (mapping, how) == ({"model.a": "model.a", "b": "model.b"}, "added prefix 'model.'")


def test_the_prefix_is_removed_where_the_architecture_has_none():
    mapping, how = match_keys(["model.a", "model.b", "lm_head.weight"], ["a", "b", "lm_head.weight"], "model")
    assert (mapping, how) == ({"model.a": "a", "model.b": "b", "lm_head.weight": "lm_head.weight"},
                              "removed prefix 'model.'")


def test_two_file_keys_landing_on_one_architecture_key_keep_the_first():
    """With the prefix added, ``embed`` and ``model.embed`` both become ``model.embed``: one of them
    (the first in the file) takes it, and the other is left unmatched rather than read twice."""
    mapping, how = match_keys(["model.embed", "embed", "norm"], ["model.embed", "model.norm"], "model")
    assert how == "added prefix 'model.'"
    assert mapping == {"model.embed": "model.embed", "norm": "model.norm"}
    mapping, _ = match_keys(["embed", "model.embed", "norm"], ["model.embed", "model.norm"], "model")
    assert mapping == {"embed": "model.embed", "norm": "model.norm"}


def test_without_a_prefix_only_the_keys_as_they_are_match():
    assert match_keys(["model.a", "b"], ["a", "b"], "") == ({"b": "b"}, "")


def test_a_tie_between_options_keeps_the_earlier_one():
    """As many keys match as they are as with the prefix removed: nothing is renamed."""
    mapping, how = match_keys(["model.a", "b"], ["a", "model.a"], "model")
    assert (mapping, how) == ({"model.a": "model.a"}, "")
