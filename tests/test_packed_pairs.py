"""find_packed_heads on hand-made facts: which tensors can pair, aliases, empty tensors and 1-D packed storage."""

from __future__ import annotations

import math

from tiecheck.analyses.packed import PackedHead, Packing, find_packed_heads
from tiecheck.facts import TensorFact

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _fact(name: str, shape: tuple[int, ...], storage: int, dtype: str = "bfloat16", itemsize: int = 2) -> TensorFact:
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return TensorFact(name=name, shape=shape, stride=stride, dtype=dtype, itemsize=itemsize, device="cpu",
                      storage=("cpu", storage), byte_start=0, byte_end=itemsize * math.prod(shape),
                      owner=name.rsplit(".", 1)[0])


def test_a_head_packed_into_one_dimension_still_pairs():
    # A GGUF Q8_0 output: 128 values in 4 blocks of 34 bytes, stored 1-D; the format names the role and the
    # logical [32, 4]. Its companions (none in GGUF) and an unrelated 1-D tensor do not pair.
    q8 = Packing(shape=(32, 4), format="Q8_0 (GGUF)", role="head")
    facts = [_fact("token_embd.weight", (32, 4), 1), _fact("output.weight", (136,), 2, dtype="uint8", itemsize=1),
             _fact("output_norm.weight", (4,), 3, dtype="float32", itemsize=4)]
    packings = {"output.weight": q8, "token_embd.weight": Packing(shape=(32, 4), format="F16", role="embedding")}
    assert find_packed_heads(facts, packings) == [PackedHead(
        names=("token_embd.weight", "output.weight"), shape=(32, 4), formats=("F16", "Q8_0 (GGUF)"), head_bytes=136,
        embedding_bytes=256, companions=())]


def test_companions_count_with_the_head_and_never_pair():
    # An nf4 head stored [64, 1] (two values a byte) with its absmax companion: 64 + 8 bytes of head.
    nf4 = Packing(shape=(32, 4), format="nf4 (bitsandbytes 4-bit)", companions=("lm_head.weight.absmax",))
    facts = [_fact(EMB, (32, 4), 1), _fact(HEAD, (64, 1), 2, dtype="uint8", itemsize=1),
             _fact("lm_head.weight.absmax", (2,), 3, dtype="float32", itemsize=4)]
    assert find_packed_heads(facts, {HEAD: nf4}) == [PackedHead(
        names=(EMB, HEAD), shape=(32, 4), formats=("bfloat16", "nf4 (bitsandbytes 4-bit)"), head_bytes=72,
        embedding_bytes=256, companions=("lm_head.weight.absmax",))]


def test_a_head_under_two_names_is_one_pair():
    # lm_head.weight and output.weight are one int8 memory: one pair, with the first name.
    facts = [_fact(EMB, (32, 4), 1), _fact(HEAD, (32, 4), 2, dtype="int8", itemsize=1),
             _fact("output.weight", (32, 4), 2, dtype="int8", itemsize=1)]
    (p,) = find_packed_heads(facts, {})
    assert (p.names, p.formats, p.head_bytes) == ((EMB, HEAD), ("bfloat16", "int8"), 128)


def test_empty_tensors_never_pair():
    facts = [_fact(EMB, (0, 4), 1), _fact(HEAD, (0, 4), 2, dtype="int8", itemsize=1)]
    assert find_packed_heads(facts, {}) == []


def test_facts_may_be_any_iterable():
    facts = [_fact(EMB, (32, 4), 1), _fact(HEAD, (32, 4), 2, dtype="int8", itemsize=1)]
    assert [p.names for p in find_packed_heads(iter(facts), {})] == [(EMB, HEAD)]
