"""The adapter analysis called directly: peft's module matching, TC024, the touched-tie rows and TC023's text.

Plain dicts in, so every case peft's config allows (a regular expression, a list of suffixes,
``all-linear``, ``exclude_modules``, ``ensure_weight_tying``) is written out with its expected
answer; test_peft_adapter.py holds the same code to real PEFT folders.
"""

from __future__ import annotations

import pytest

from tiecheck.analyses.adapter import adapter_findings, missing_modules, module_matches, touched_ties
from tiecheck.analyses.ties import TieGroup

HEAD, EMB = "lm_head.weight", "model.embed_tokens.weight"
def group(*names: str) -> TieGroup:
    """A tie group of the base model, as touched_ties reads it (its names)."""
    return TieGroup(names=names, kind="shared_storage", shape=(64, 16), dtype="float32", numel=1024, itemsize=4)


GROUP = group(HEAD, EMB)


# -- module_matches: as peft's check_target_module_exists ---------------------------------------------


@pytest.mark.parametrize(("key", "spec", "expected"), [
    ("lm_head", ["lm_head"], True),                              # the whole path
    ("model.layers.0.q_proj", ["q_proj"], True),                 # the end of the path after a dot
    ("model.layers.0.xq_proj", ["q_proj"], False),               # a suffix that is not a whole piece
    ("q_proj.inner", ["q_proj"], False),                         # a start is not an end
    ("lm_head", ["q_proj", "lm_head"], True),                    # any entry
    ("lm_head", [], False),
    ("lm_head", None, False),
    ("lm_head", "", False),
    ("model.layers.0.q_proj", r".*\.q_proj", True),              # a string is a regular expression ...
    ("model.layers.0.q_proj_extra", r".*\.q_proj", False),       # ... on the whole path
    ("model.layers.0.q_proj", "q_proj", False),                  # a string is not a suffix
    ("lm_head", "lm_head", True),
    ("lm_head", "lm_head(", False),                              # not a regular expression: no match
])
def test_module_matches(key, spec, expected):
    assert module_matches(key, spec) is expected


# -- TC024: a listed module the base does not have ----------------------------------------------------

BASE = [HEAD, EMB, "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias", "scale"]


def test_every_listed_module_present_gives_nothing():
    info = {"modules_to_save": ["lm_head"], "target_modules": ["q_proj", "embed_tokens"]}
    assert missing_modules(info, BASE) == []


def test_a_missing_module_in_each_field_is_one_finding_each_in_field_order():
    info = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head", "score", "classifier"]}
    found = missing_modules(info, BASE)
    assert [(f.code, f.severity, f.names) for f in found] == [
        ("TC024", "error", ("score",)), ("TC024", "error", ("classifier",)), ("TC024", "error", ("v_proj",))]
    assert found[0].message == ("adapter_config.json modules_to_save names 'score', but the base model has no module "
                                "named 'score': peft refuses to load the adapter on it")
    assert found[2].message.startswith("adapter_config.json target_modules names 'v_proj'")


def test_a_regular_expression_that_matches_nothing_is_named_as_one():
    found = missing_modules({"target_modules": r".*\.v_proj"}, BASE)
    (f,) = found
    assert f.names == (r".*\.v_proj",)
    assert f.message == (r"adapter_config.json target_modules names '.*\\.v_proj', but the base model has no module "
                         r"matching '.*\\.v_proj': peft refuses to load the adapter on it")
    assert missing_modules({"target_modules": r".*\.q_proj"}, BASE) == []


def test_all_linear_and_empty_fields_are_not_module_names():
    assert missing_modules({"target_modules": "all-linear", "modules_to_save": None}, BASE) == []
    assert missing_modules({"target_modules": [], "modules_to_save": []}, BASE) == []
    assert missing_modules({}, BASE) == []


def test_a_root_tensor_is_the_root_module_not_a_module_named_after_it():
    # "scale" lives on the root module (path ""): an entry "scale" names no module.
    (f,) = missing_modules({"modules_to_save": ["scale"]}, BASE)
    assert f.names == ("scale",)


# -- the touched-tie rows -----------------------------------------------------------------------------


def test_modules_to_save_on_one_side_of_a_tie():
    rows = touched_ties({"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}, [GROUP],
                        {"lm_head": 512, "model.embed_tokens": 9}, {HEAD: False, EMB: True})
    assert rows == [{"names": [HEAD, EMB], "touched": HEAD, "how": "modules_to_save", "bytes": 512,
                     "equal_to_base": False, "retied_by_peft": False}]


def test_target_modules_on_the_other_side_carry_no_equality():
    rows = touched_ties({"target_modules": ["embed_tokens"]}, [GROUP], {"model.embed_tokens": 96},
                        {EMB: True})
    assert rows == [{"names": [HEAD, EMB], "touched": EMB, "how": "target_modules", "bytes": 96,
                     "equal_to_base": None, "retied_by_peft": False}]


def test_a_module_in_both_lists_is_saved_whole():
    rows = touched_ties({"modules_to_save": ["lm_head"], "target_modules": ["lm_head"]}, [GROUP], {}, {})
    assert [(r["touched"], r["how"], r["bytes"], r["equal_to_base"]) for r in rows] == [
        (HEAD, "modules_to_save", 0, None)]


def test_exclude_modules_keeps_lora_off_but_not_a_whole_copy():
    info = {"target_modules": ["lm_head", "embed_tokens"], "exclude_modules": ["lm_head"]}
    assert [r["touched"] for r in touched_ties(info, [GROUP], {}, {})] == [EMB]
    info = {"modules_to_save": ["lm_head"], "exclude_modules": ["lm_head"]}
    assert [r["how"] for r in touched_ties(info, [GROUP], {}, {})] == ["modules_to_save"]


def test_both_sides_touched_give_two_rows_and_peft_retying_marks_each():
    info = {"modules_to_save": ["lm_head", "embed_tokens"], "ensure_weight_tying": True}
    rows = touched_ties(info, [GROUP, group("a.weight", "b.weight")], {"lm_head": 1, "model.embed_tokens": 2},
                        {HEAD: True, EMB: True})
    assert [(r["touched"], r["bytes"], r["retied_by_peft"]) for r in rows] == [(HEAD, 1, True), (EMB, 2, True)]


def test_untouched_ties_give_no_row():
    assert touched_ties({"target_modules": ["q_proj"]}, [GROUP], {}, {}) == []
    assert touched_ties({}, [GROUP], {}, {}) == []


def test_a_regular_expression_reaches_the_tie():
    rows = touched_ties({"target_modules": r"lm_head|.*\.q_proj"}, [GROUP], {"lm_head": 7}, {})
    assert [(r["touched"], r["how"], r["bytes"]) for r in rows] == [(HEAD, "target_modules", 7)]


# -- TC023 --------------------------------------------------------------------------------------------


def row(**changes) -> dict:
    return {"names": [HEAD, EMB], "touched": HEAD, "how": "modules_to_save", "bytes": 4096,
            "equal_to_base": False, "retied_by_peft": False, **changes}


def test_a_trained_whole_copy():
    (f,) = adapter_findings([row()], {frozenset([HEAD, EMB]): ["config.json", "_tied_weights_keys"]})
    assert (f.code, f.severity, f.names, f.data) == ("TC023", "warning", (HEAD, EMB), {"bytes": 4096})
    assert f.message == (
        f"adapter_config.json modules_to_save saves {HEAD} whole (4,096 bytes), but the base ties it to {EMB} "
        f"(config.json and _tied_weights_keys): an independent copy of one side of a tie; the copy differs from the "
        f"base's (trained): merge_and_unload() puts it in the model, so {HEAD} no longer equals {EMB}; peft versions "
        f"that leave tie_word_embeddings=true (peft#2777) produce a model that says tied while its head differs "
        f"(TC015: transformers 4 and engines that trust the flag serve {EMB} as {HEAD}); peft 0.21 sets the flag "
        f"false in memory, so the merged model is untied and stores 4,096 more bytes")


def test_an_untrained_whole_copy():
    (f,) = adapter_findings([row(equal_to_base=True, bytes=12)], {})
    assert f.message == (
        f"adapter_config.json modules_to_save saves {HEAD} whole (12 bytes), but the base ties it to {EMB}: an "
        f"independent copy of one side of a tie; the copy still equals the base's (untrained): 12 bytes stored for "
        f"nothing, and after merge_and_unload() the two hold equal values in separate memory (TC016 where the flag "
        f"still says tied)")


def test_a_whole_copy_not_compared():
    (f,) = adapter_findings([row(equal_to_base=None)], {frozenset([HEAD, EMB]): []})
    assert f"but the base ties it to {EMB}: an independent" in f.message
    assert "; the copy is trained apart: merge_and_unload() puts it in the model" in f.message


def test_a_lora_delta_on_a_three_way_tie():
    names = ["decoder.embed.weight", "encoder.embed.weight", "lm_head.weight"]
    (f,) = adapter_findings([row(names=names, touched="lm_head.weight", how="target_modules", bytes=80,
                                 equal_to_base=None)], {frozenset(names): ["_tied_weights_keys"]})
    assert (f.code, f.names, f.data) == ("TC023", tuple(names), {"bytes": 80})
    assert f.message == (
        "adapter_config.json target_modules trains a LoRA delta for lm_head.weight (80 bytes), but the base ties it "
        "to decoder.embed.weight, encoder.embed.weight (_tied_weights_keys): merge_and_unload() adds the delta into "
        "the shared tensor, so decoder.embed.weight, encoder.embed.weight changes with it (the input side gets the "
        "output side's update)")


def test_ties_peft_restores_give_no_finding_and_the_rest_keep_their_order():
    rows = [row(retied_by_peft=True), row(touched=EMB, how="target_modules", bytes=5),
            row(bytes=6)]
    found = adapter_findings(rows, {})
    assert [f.data["bytes"] for f in found] == [5, 6]
    assert found[0].message.startswith(f"adapter_config.json target_modules trains a LoRA delta for {EMB} (5 bytes), "
                                       f"but the base ties it to {HEAD}:")
