"""The content pass's all-equal worst case: samples bucket, and bytes decide.

A tensor small enough to be sampled whole (``WHOLE_BYTES``) needs no full comparison: its sample is
all its bytes. A sample longer than any partial one is bucketed by its digest, so a digest that
collides must never make two different tensors one group: the bytes are read again and compared.
A bucket of 100,000 equal tensors costs one sample each, and the candidates between its members
are looked for only where a member holds an embedding.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import tiecheck
from tiecheck.analyses import candidates, sample_keys
from tiecheck.analyses.candidates import member_candidates
from tiecheck.analyses.duplicates import find_untied_duplicates
from tiecheck.facts import TensorFact
from tiecheck.loaders.content import WHOLE_BYTES

from support.checkpoints import write_safetensors


class WholeReader:
    """A ContentReader over plain bytes that samples every tensor whole, as the torch reader samples a small one."""

    whole_sample_bytes = WHOLE_BYTES

    def __init__(self, data: dict[str, bytes]):
        self.data = data
        self.bytes_read = 0
        self.compared: list[tuple[str, str]] = []

    def sample(self, name: str) -> bytes:
        self.bytes_read += len(self.data[name])
        return self.data[name]

    def is_constant(self, name: str) -> bool:
        return len(set(self.data[name])) == 1

    def equal(self, a: str, b: str) -> bool:
        self.compared.append((a, b))
        return self.data[a] == self.data[b]


def _fact(name: str, nbytes: int, storage: int) -> TensorFact:
    return TensorFact(name=name, shape=(nbytes,), stride=(1,), dtype="uint8", itemsize=1, device="cpu",
                      storage=("cpu", storage), byte_start=0, byte_end=nbytes)


@pytest.mark.parametrize("nbytes", [sample_keys.KEY_BYTES + 44, WHOLE_BYTES])
def test_colliding_digests_of_different_bytes_are_told_apart(monkeypatch, nbytes):
    monkeypatch.setattr(sample_keys, "_hash", lambda sig: 0)  # every long sample has one key
    same = bytes((7 * i + 1) % 251 for i in range(nbytes))  # not a palindrome: reversed, it differs
    data = {"a": same, "b": same[::-1], "c": same, "d": same[:-1] + b"\1", "e": same[::-1]}
    reader = WholeReader(data)
    groups, stats = find_untied_duplicates([_fact(n, nbytes, i) for i, n in enumerate(data)], reader)
    assert [g.names for g in groups] == [("a", "c"), ("b", "e")]
    assert not reader.compared  # decided on the samples' bytes, read again under the one digest
    assert stats.sampled == 2 * len(data)


def test_short_whole_samples_are_their_own_key_and_need_no_comparison():
    data = {f"t{i}": b"\1\2\3\4" for i in range(50)} | {"odd": b"\1\2\3\5"}
    reader = WholeReader(data)
    (g,), stats = find_untied_duplicates([_fact(n, 4, i) for i, n in enumerate(data)], reader)
    assert g.names == tuple(sorted(f"t{i}" for i in range(50)))
    assert (stats.full_comparisons, stats.sampled, reader.compared) == (0, 51, [])


def test_a_view_rereading_its_elements_is_still_left_to_equal():
    # Not dense (4 elements over 1 stored byte, stride 0): sampled whole, but equality stays equal()'s call.
    facts = [TensorFact(name=n, shape=(4,), stride=(0,), dtype="uint8", itemsize=1, device="cpu",
                        storage=("cpu", i), byte_start=0, byte_end=1) for i, n in enumerate("ab")]
    reader = WholeReader({"a": b"\7" * 4, "b": b"\7" * 4})
    reader.equal = lambda a, b: False  # the torch reader declines what it would have to walk twice over
    groups, stats = find_untied_duplicates(facts, reader)
    assert groups == []
    assert stats.full_comparisons == 1


def _file(tmp_path, tensors):
    return str(write_safetensors(tmp_path / "m.safetensors", tensors))


def test_equal_small_tensors_in_a_file_are_one_group_without_full_comparisons(tmp_path):
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    tensors = {f"layers.{i}.w": w.clone() for i in range(300)}
    tensors["layers.odd.w"] = w.flip(0).contiguous()  # the same bytes in another order
    r = tiecheck.analyze(_file(tmp_path, tensors))
    (g,) = r.untied_duplicates
    assert len(g.names) == 300
    assert "layers.odd.w" not in g.names
    assert r.content.stats.full_comparisons == 0


def test_equal_tensors_over_the_whole_sample_size_are_still_compared_in_full(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(WHOLE_BYTES // 4 + 8, generator=g)
    near = w.clone()
    near[5000 % len(w)] += 1  # outside every sampled run: the samples agree, the bytes do not
    r = tiecheck.analyze(_file(tmp_path, {"a": w, "b": w.clone(), "c": near}))
    assert [d.names for d in r.untied_duplicates] == [("a", "b")]
    assert r.content.stats.full_comparisons == 2


def _brute_force(members, by_name):
    """member_candidates as it was: every pair of members, every pair of their names."""
    members = [[by_name[n] for n in m if n in by_name] for m in members]
    out = []
    for i, a_names in enumerate(members):
        for b_names in members[i + 1:]:
            for a, b in itertools.product(a_names, b_names):
                ra, rb = candidates._roles(a), candidates._roles(b)
                rel = candidates._relation(a, b, ra, rb)
                if rel is not None:
                    out.append(candidates.Candidate(tuple(sorted((a.name, b.name))), rel, a.shape, a.dtype, b.nbytes))
    return out


def _named(name: str, storage: int, role: str = "tensor") -> TensorFact:
    shape = (32, 4)
    return TensorFact(name=name, shape=shape, stride=(4, 1), dtype="float32", itemsize=4, device="cpu",
                      storage=("cpu", storage), byte_start=0, byte_end=4 * math.prod(shape), role=role,
                      owner=name.rsplit(".", 1)[0])


def test_member_candidates_are_the_pairs_every_pair_would_give():
    # Embeddings, heads, plain weights and a buffer, some members with several names, in a mixed order.
    names = [["layers.0.w.weight"], ["model.embed_tokens.weight", "x.alias.weight"], ["lm_head.weight"],
             ["layers.1.w.weight"], ["encoder.embed_tokens.weight"], ["rope.embedding.weight"],
             ["layers.2.w.weight", "output.weight"], ["decoder.embed_tokens.weight"]]
    facts = {n: _named(n, i, role="buffer" if n.startswith("rope") else "tensor")
             for i, m in enumerate(names) for n in m}
    got = member_candidates(names, facts)
    assert got == _brute_force(names, facts)
    assert {c.relation for c in got} == {"embeddings", "embedding-output"}


def test_member_candidates_of_a_big_group_without_embeddings_look_at_no_pair(monkeypatch):
    names = [[f"layers.{i}.w"] for i in range(20_000)]
    facts = {m[0]: _named(m[0], i) for i, m in enumerate(names)}
    looked = []
    real = candidates._relation
    monkeypatch.setattr(candidates, "_relation", lambda *a: looked.append(1) or real(*a))
    assert member_candidates(names, facts) == []
    assert looked == []
