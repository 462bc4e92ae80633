"""compare_layers called directly: each physical and stored state, and the finding each disagreement gives.

Hand-made facts and a reader over a dict, so every expected row and message is written out here
rather than derived from a model; the end-to-end declared-layer tests (test_declared*.py) build
real folders and reach only some of these states.
"""

from __future__ import annotations

import pytest

from tiecheck.analyses.layers import LayerRow, compare_layers
from tiecheck.facts import TensorFact

HEAD, EMB = "lm_head.weight", "model.embed_tokens.weight"


def fact(name: str, *, storage: int | None = 1, start: int = 0, shape=(4, 2), dtype="float32",
         itemsize: int = 4) -> TensorFact:
    n = 1
    for s in shape:
        n *= s
    return TensorFact(name=name, shape=tuple(shape), stride=(shape[1], 1) if len(shape) == 2 else (1,),
                      dtype=dtype, itemsize=itemsize, device="cpu",
                      storage=None if storage is None else ("cpu", storage),
                      byte_start=start, byte_end=start + n * itemsize)


class Reader:
    """A content reader over named byte strings: the sample is the first byte, equality the whole."""

    def __init__(self, contents: dict[str, bytes]):
        self.contents = contents
        self.sampled: list[str] = []
        self.compared: list[tuple[str, str]] = []

    def sample(self, name: str) -> bytes:
        self.sampled.append(name)
        return self.contents[name][:1]

    def equal(self, a: str, b: str) -> bool:
        self.compared.append((a, b))
        return self.contents[a] == self.contents[b]


def pair(declared: bool = True, by=("config.json",), **extra) -> dict:
    return {"names": (HEAD, EMB), "declared": declared, "by": list(by), **extra}


def one(pairs, facts, stored, reader=None) -> tuple[LayerRow, list]:
    rows, findings = compare_layers(pairs, facts, stored, reader)
    (row,) = rows
    return row, findings


# -- the physical layer ------------------------------------------------------------------------------


def test_a_name_missing_from_the_facts_is_absent_and_its_partner_gives_the_size():
    row, _ = one([pair()], [fact(EMB, shape=(3, 2))], None)
    assert (row.physical, row.nbytes) == ("absent", 24)
    row, _ = one([pair()], [fact(HEAD, shape=(5, 2))], None)
    assert (row.physical, row.nbytes) == ("absent", 40)
    row, _ = one([pair()], [], {})
    assert (row.physical, row.stored, row.nbytes) == ("absent", "not stored", 0)


def test_the_size_is_the_sources_when_both_are_there():
    row, _ = one([pair()], [fact(HEAD, shape=(5, 2)), fact(EMB, storage=2, shape=(3, 2))], None)
    assert row.nbytes == 24


def test_one_memory_is_tied_whatever_a_reader_would_say():
    reader = Reader({HEAD: b"a", EMB: b"b"})
    row, _ = one([pair()], [fact(HEAD), fact(EMB)], None, reader)
    assert row.physical == "tied"
    assert reader.sampled == reader.compared == []


def test_separate_memory_without_a_reader_is_separate():
    row, _ = one([pair()], [fact(HEAD), fact(EMB, storage=2)], None)
    assert row.physical == "separate"


@pytest.mark.parametrize("other", [
    fact(EMB, storage=2, shape=(2, 4)),                         # another shape
    fact(EMB, storage=2, dtype="float16", itemsize=2),          # another dtype
    fact(EMB, storage=None),                                    # no memory to read (meta)
], ids=["shape", "dtype", "meta"])
def test_what_cannot_be_compared_is_not_read(other):
    reader = Reader({HEAD: b"ab", EMB: b"ab"})
    row, _ = one([pair()], [fact(HEAD), other], None, reader)
    assert row.physical == "separate"
    assert reader.sampled == reader.compared == []


def test_a_tensor_without_memory_on_the_target_side_is_not_read_either():
    reader = Reader({HEAD: b"ab", EMB: b"ab"})
    row, _ = one([pair()], [fact(HEAD, storage=None), fact(EMB, storage=2)], None, reader)
    assert row.physical == "separate"
    assert reader.sampled == []


def test_samples_that_differ_settle_it_without_reading_the_whole():
    # The 8B-folder case: two heads that differ in their first bytes need no full comparison.
    reader = Reader({HEAD: b"xb", EMB: b"yb"})
    row, _ = one([pair()], [fact(HEAD), fact(EMB, storage=2)], None, reader)
    assert row.physical == "separate, different"
    assert reader.sampled == [HEAD, EMB]
    assert reader.compared == []


@pytest.mark.parametrize(("emb", "physical"), [(b"ab", "separate, equal"), (b"ac", "separate, different")])
def test_equal_samples_go_on_to_the_whole(emb, physical):
    reader = Reader({HEAD: b"ab", EMB: emb})
    row, _ = one([pair()], [fact(HEAD), fact(EMB, storage=2)], None, reader)
    assert row.physical == physical
    assert reader.compared == [(HEAD, EMB)]


# -- the stored layer --------------------------------------------------------------------------------


def test_no_mapping_means_no_files():
    row, _ = one([pair()], [fact(HEAD), fact(EMB)], None)
    assert row.stored == "no files (in memory)"


@pytest.mark.parametrize(("stored", "state"), [
    ({}, "not stored"),
    ({HEAD: None, EMB: None}, "not stored"),
    ({EMB: "s1"}, "one copy"),
    ({HEAD: "s1"}, "one copy"),
    ({HEAD: "s1", EMB: "s1"}, "one copy (shared storage)"),
])
def test_stored_states_from_the_copies_alone(stored, state):
    row, _ = one([pair()], [fact(HEAD), fact(EMB)], stored)
    assert row.stored == state


@pytest.mark.parametrize(("emb", "state"), [
    (fact(EMB, storage=2, shape=(2, 4)), "two copies of different shape or dtype"),
    (fact(EMB, storage=2, dtype="bfloat16", itemsize=2), "two copies of different shape or dtype"),
])
def test_two_copies_that_cannot_be_equal(emb, state):
    reader = Reader({HEAD: b"ab", EMB: b"ab"})
    row, findings = one([pair()], [fact(HEAD), emb], {HEAD: "s1", EMB: "s2"}, reader)
    assert row.stored == state
    assert findings == []


def test_two_copies_when_a_name_has_no_fact_are_compared_as_nothing():
    row, findings = one([pair()], [fact(EMB)], {HEAD: "s1", EMB: "s2"})
    assert (row.physical, row.stored, findings) == ("absent", "two copies", [])


@pytest.mark.parametrize(("emb", "state"), [(b"ab", "two equal copies"), (b"ac", "two different copies")])
def test_two_copies_of_one_shape_take_the_readers_answer(emb, state):
    reader = Reader({HEAD: b"ab", EMB: emb})
    row, _ = one([pair()], [fact(HEAD), fact(EMB, storage=2)], {HEAD: "s1", EMB: "s2"}, reader)
    assert row.stored == state


def test_two_copies_without_a_reader_are_just_two_copies():
    row, findings = one([pair()], [fact(HEAD), fact(EMB, storage=2)], {HEAD: "s1", EMB: "s2"})
    assert row.stored == "two copies"
    assert findings == []


def test_a_row_as_a_dict():
    row, _ = one([pair(by=("config.json", "_tied_weights_keys"), conflict=1)],
                 [fact(HEAD), fact(EMB)], {HEAD: "s1", EMB: "s1"})
    assert row.to_dict() == {"names": [HEAD, EMB], "declared": True, "conflict": True,
                             "by": ["config.json", "_tied_weights_keys"], "physical": "tied",
                             "stored": "one copy (shared storage)", "bytes": 32}
    assert row.by == ("config.json", "_tied_weights_keys")


def test_a_pair_without_a_conflict_key_has_none():
    row, findings = one([pair()], [fact(HEAD), fact(EMB)], {HEAD: "s1", EMB: "s1"})
    assert row.conflict is False
    assert row.declared is True
    assert findings == []


# -- the findings ------------------------------------------------------------------------------------


def codes(findings) -> list[str]:
    return [f.code for f in findings]


def test_declared_tied_stored_different_is_an_error_naming_the_files():
    reader = Reader({HEAD: b"xb", EMB: b"yb"})
    _, findings = one([pair()], [fact(HEAD), fact(EMB, storage=2)], {HEAD: "s1", EMB: "s2"}, reader)
    (f,) = findings
    assert (f.code, f.severity, f.names) == ("TC015", "error", (HEAD, EMB))
    assert f.message.startswith(f"config.json declares them tied, but the files store {HEAD} and {EMB} with "
                                "different content: transformers 5 warns")
    assert f"the stored {HEAD} is replaced by {EMB}" in f.message
    assert f"serve {EMB} as {HEAD}" in f.message


def test_declared_tied_different_in_memory_names_memory():
    reader = Reader({HEAD: b"xb", EMB: b"yb"})
    _, findings = one([pair(by=("config.json", "_tied_weights_keys"))], [fact(HEAD), fact(EMB, storage=2)],
                      None, reader)
    (f,) = findings
    assert f.code == "TC015"
    assert f.message.startswith(f"config.json and _tied_weights_keys declare them tied, but memory holds {HEAD} "
                                f"and {EMB} with different content")


def test_declared_tied_stored_twice_equal_is_a_warning_with_the_waste():
    reader = Reader({HEAD: b"ab", EMB: b"ab"})
    _, findings = one([pair()], [fact(HEAD, shape=(8, 2)), fact(EMB, storage=2, shape=(8, 2))],
                      {HEAD: "s1", EMB: "s2"}, reader)
    (f,) = findings
    assert (f.code, f.severity, f.data) == ("TC016", "warning", {"bytes_wasted": 64})
    assert f.message == (f"config.json declares them tied, and the files store both {HEAD} and {EMB} with equal "
                         "content (64 bytes stored twice; transformers re-ties them on load)")


def test_declared_tied_equal_copies_in_memory_say_how_to_retie():
    reader = Reader({HEAD: b"ab", EMB: b"ab"})
    _, findings = one([pair()], [fact(HEAD), fact(EMB, storage=2)], None, reader)
    (f,) = findings
    assert (f.code, f.data) == ("TC016", {"bytes_wasted": 32})
    assert f.message == (f"config.json declares them tied, but memory holds {HEAD} and {EMB} as two equal copies "
                         "(32 bytes twice): re-tie with `model.tie_weights()`")


@pytest.mark.parametrize("physical_facts", [
    [fact(HEAD), fact(EMB)],                          # tied
    [fact(HEAD), fact(EMB, storage=2)],               # separate, not compared
])
def test_declared_tied_and_in_agreement_or_unknown_gives_nothing_in_memory(physical_facts):
    _, findings = one([pair()], physical_facts, None)
    assert findings == []


@pytest.mark.parametrize("stored", [{EMB: "s1"}, {HEAD: "s1", EMB: "s1"}, {}])
def test_declared_tied_with_one_copy_is_what_a_tie_should_store(stored):
    _, findings = one([pair()], [fact(HEAD), fact(EMB)], stored)
    assert findings == []


@pytest.mark.parametrize(("stored", "gone", "kept"), [({EMB: "s1"}, HEAD, EMB), ({HEAD: "s1"}, EMB, HEAD)])
def test_declared_untied_with_one_copy_names_the_one_initialised_randomly(stored, gone, kept):
    _, findings = one([pair(declared=False)], [fact(HEAD), fact(EMB)], stored)
    (f,) = findings
    assert (f.code, f.severity, f.names) == ("TC017", "error", (HEAD, EMB))
    assert f.message == (f"config.json declares them untied, but the files hold only {kept}: transformers and "
                         f"engines that trust the declaration initialise {gone} randomly on load (the model produces "
                         f"gibberish); if {gone} is meant to be {kept}, declare them tied")


@pytest.mark.parametrize("stored", [None, {HEAD: "s1", EMB: "s1"}], ids=["memory", "shared-storage"])
def test_declared_untied_but_one_memory(stored):
    _, findings = one([pair(declared=False, by=("config.json", "text_config"))], [fact(HEAD), fact(EMB)], stored)
    (f,) = findings
    assert (f.code, f.severity) == ("TC018", "warning")
    assert f.message == (f"config.json and text_config declare them untied, but {HEAD} and {EMB} share memory: a "
                         "loader that trusts the declaration builds two tensors")


@pytest.mark.parametrize("stored", [{}, {HEAD: "s1", EMB: "s2"}], ids=["not-stored", "two-copies"])
def test_declared_untied_and_one_memory_but_not_stored_as_one_says_nothing(stored):
    _, findings = one([pair(declared=False)], [fact(HEAD), fact(EMB)], stored)
    assert findings == []


def test_declared_untied_and_separate_is_in_agreement():
    reader = Reader({HEAD: b"ab", EMB: b"ac"})
    _, findings = one([pair(declared=False)], [fact(HEAD), fact(EMB, storage=2)], {HEAD: "s1", EMB: "s2"}, reader)
    assert findings == []
    _, findings = one([pair(declared=False)], [fact(HEAD), fact(EMB, storage=2)], None, reader)
    assert findings == []


def test_disagreeing_declarations_are_reported_beside_the_layers():
    p = pair(by=("text_config", "config.json"), conflict=True,
             claims={"text_config": True, "config.json": False})
    reader = Reader({HEAD: b"xb", EMB: b"yb"})
    _, findings = one([p], [fact(HEAD), fact(EMB, storage=2)], {HEAD: "s1", EMB: "s2"}, reader)
    assert codes(findings) == ["TC019", "TC015"]
    conflict = findings[0]
    assert (conflict.severity, conflict.names) == ("warning", (HEAD, EMB))
    assert conflict.message == (f"declarations about {HEAD} and {EMB} disagree (text_config: tied; config.json: "
                                "untied); transformers follows text_config, engines that read another key build "
                                "another model")


def test_every_pair_gets_its_row_and_its_findings_in_order():
    other = ("model.decoder.embed_tokens.weight", "model.encoder.embed_tokens.weight")
    pairs = [pair(declared=False), {"names": other, "declared": True, "by": ["_tied_weights_keys"]}]
    facts = [fact(HEAD), fact(EMB), fact(other[0], storage=3), fact(other[1], storage=4)]
    reader = Reader({HEAD: b"a", EMB: b"a", other[0]: b"ab", other[1]: b"ab"})
    rows, findings = compare_layers(pairs, facts, {EMB: "s1", other[0]: "s3", other[1]: "s4"}, reader)
    assert [(r.names, r.physical, r.stored) for r in rows] == [
        ((HEAD, EMB), "tied", "one copy"),
        (other, "separate, equal", "two equal copies"),
    ]
    assert codes(findings) == ["TC017", "TC016"]
