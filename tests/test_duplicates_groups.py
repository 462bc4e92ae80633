"""Duplicate groups: the fields of each group, and constant-valued duplicates (equal by construction, an init)."""

from __future__ import annotations

import dataclasses

import pytest

from tiecheck.analyses.candidates import Candidate, role_relations
from tiecheck.analyses.duplicates import Relation, duplicate_findings, find_untied_duplicates
from tiecheck.facts import TensorFact


class BytesReader:
    """A ContentReader over plain bytes (int8 elements): samples are the first and last element."""

    def __init__(self, data: dict[str, bytes]):
        self.data = data
        self.bytes_read = 0

    def sample(self, name: str) -> bytes:
        self.bytes_read += 2
        return self.data[name][:1] + self.data[name][-1:]

    def is_constant(self, name: str) -> bool:
        return len(set(self.data[name])) == 1

    def equal(self, a: str, b: str) -> bool:
        self.bytes_read += len(self.data[a]) + len(self.data[b])
        return self.data[a] == self.data[b]


def _int8(name: str, n: int, storage: int) -> TensorFact:
    return TensorFact(name=name, shape=(n,), stride=(1,), dtype="int8", itemsize=1, device="cpu",
                      storage=("cpu", storage), byte_start=0, byte_end=n)


@pytest.mark.parametrize(("n", "constant"), [(1, False), (2, True), (3, True)])
def test_constant_flag_from_two_elements_on(n, constant):
    # Two separate memories holding n equal elements each. From two elements on, every element equal
    # means constant (e.g. a fresh LayerNorm weight); one element is always 'equal to itself', so a
    # one-element duplicate is a real duplicate.
    reader = BytesReader({"a": b"\x05" * n, "b": b"\x05" * n})
    (g,), _ = find_untied_duplicates([_int8("a", n, 1), _int8("b", n, 2)], reader)
    assert g.names == ("a", "b")
    assert g.nbytes == n
    assert g.constant is constant
    assert [f.code for f in duplicate_findings([g])] == ([] if constant else ["TC005"])


def test_two_element_duplicate_that_is_not_constant():
    reader = BytesReader({"a": b"\x05\x06", "b": b"\x05\x06"})
    (g,), _ = find_untied_duplicates([_int8("a", 2, 1), _int8("b", 2, 2)], reader)
    assert g.constant is False
    (f,) = duplicate_findings([g])
    assert f.code == "TC005"
    assert f.message.startswith("a, b hold equal int8 [2] content in separate memory (2 bytes")


def test_group_fields_come_from_its_own_members():
    # The duplicates are not the last memory read: a group's shape, dtype and size must be its members',
    # not those of whichever tensor the bucketing loop saw last.
    facts = [_int8("a", 2, 1), _int8("b", 2, 2),
             TensorFact(name="z", shape=(3, 2), stride=(2, 1), dtype="float16", itemsize=2, device="cpu",
                        storage=("cpu", 3), byte_start=0, byte_end=12)]
    reader = BytesReader({"a": b"\x05\x06", "b": b"\x05\x06", "z": bytes(range(12))})
    (g,), stats = find_untied_duplicates(facts, reader)
    assert (g.names, g.shape, g.dtype, g.nbytes, g.bytes_wasted) == (("a", "b"), (2,), "int8", 2, 2)
    assert g.to_dict() == {"names": ["a", "b"], "shape": [2], "dtype": "int8", "bytes_wasted": 2, "constant": False}
    assert (stats.tensors, stats.buckets, stats.bytes_total) == (3, 1, 16)


def test_a_declared_pair_makes_a_duplicate_a_broken_tie_in_every_group():
    # Two duplicate groups; the relations come as a one-shot iterator and the second group holds one.
    reader = BytesReader({"a": b"\x01\x02", "b": b"\x01\x02", "emb": b"\x03\x04\x05", "head": b"\x03\x04\x05"})
    facts = [_int8("a", 2, 1), _int8("b", 2, 2), _int8("emb", 3, 3), _int8("head", 3, 4)]
    groups, _ = find_untied_duplicates(facts, reader)
    assert [g.names for g in groups] == [("emb", "head"), ("a", "b")]
    cands = [Candidate(("emb", "head"), "embedding-output", (3,), "int8", 3)]
    relations = iter([Relation(("x", "y"), True, "x and y are one"), *role_relations(cands, None)])
    broken, plain = duplicate_findings(list(reversed(groups)), relations)[::-1]
    # Nothing relates a and b: equal values, no broken tie (info).
    assert (broken.severity, plain.severity) == ("error", "info")
    # Known by their roles alone (a bare state dict): nothing is said to declare them.
    assert broken.message == ("emb, head hold equal int8 [3] content in separate memory (3 bytes wasted); emb and "
                              "head are an input embedding and its output projection, so this is a broken tie")
    assert plain.message == ("a, b hold equal int8 [2] content in separate memory (2 bytes wasted); nothing ties or "
                             "relates these names, so this is no broken tie")
    broken, plain = duplicate_findings(groups, role_relations(cands, True))
    assert broken.message.endswith("(3 bytes wasted); the config (tie_word_embeddings=true) ties emb and head "
                                   "(input embedding and output projection), so this is a broken tie")
    assert "tie_weights()" in broken.hint
    # Untied on purpose: a warning whose hint does not offer tie_weights() (it follows the config, which says untied).
    warned, _ = duplicate_findings(groups, role_relations(cands, False))
    assert warned.severity == "warning"
    assert warned.message.endswith(
        "the config keeps emb and head untied (tie_word_embeddings=false), so the output projection is a copy of the "
        "input embedding")
    assert "leaves them apart" in warned.hint
    assert "set tie_word_embeddings=true" in warned.hint


def test_buffers_nothing_ties_are_no_finding_and_a_declared_buffer_is():
    # Two equal buffers (frequency tables, position ids): computed by the module, not a tie anything broke.
    reader = BytesReader({"a.inv_freq": b"\x01\x02", "b.inv_freq": b"\x01\x02"})
    facts = [dataclasses.replace(_int8("a.inv_freq", 2, 1), role="buffer"),
             dataclasses.replace(_int8("b.inv_freq", 2, 2), role="buffer")]
    (g,), _ = find_untied_duplicates(facts, reader)
    assert g.buffers == ("a.inv_freq", "b.inv_freq")
    assert duplicate_findings([g]) == []
    (f,) = duplicate_findings([g], [Relation(("a.inv_freq", "b.inv_freq"), True, "M ties them, so this is a broken tie")])
    assert f.severity == "error"


def test_a_non_persistent_buffer_is_never_a_duplicate():
    # register_buffer(..., persistent=False): never saved, so never a copy or a broken tie.
    reader = BytesReader({"rope.inv_freq": b"\x01\x02", "rope.original_inv_freq": b"\x01\x02"})
    facts = [dataclasses.replace(_int8("rope.inv_freq", 2, 1), role="buffer", persistent=False),
             dataclasses.replace(_int8("rope.original_inv_freq", 2, 2), role="buffer", persistent=False)]
    groups, stats = find_untied_duplicates(facts, reader)
    assert groups == []
    assert stats.tensors == 0


def test_a_tied_memory_is_named_by_its_smallest_name_whatever_the_order_of_its_facts():
    # "z" and "a" are one memory (listed "z" first), "m" a separate copy of it: the group names each
    # memory once, by its smallest name, so the same checkpoint gives the same report in any order.
    data = {"z": b"\x01\x02", "a": b"\x01\x02", "m": b"\x01\x02"}
    facts = [_int8("z", 2, 1), _int8("a", 2, 1), _int8("m", 2, 2)]
    (g,), _ = find_untied_duplicates(facts, BytesReader(data))
    assert g.names == ("a", "m")
    assert g.aliases == (("a", "z"), ("m",))
    (g2,), _ = find_untied_duplicates(list(reversed(facts)), BytesReader(data))
    assert g2 == g
