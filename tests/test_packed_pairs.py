"""find_packed_heads on hand-made facts: which tensors can pair, aliases, empty tensors and 1-D packed storage."""

from __future__ import annotations

import math

from tiecheck.analyses.layers import LayerRow
from tiecheck.analyses.packed import PackedHead, find_packed_heads, packed_head_findings
from tiecheck.facts import Packing, TensorFact

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


PAIR = PackedHead(names=(EMB, HEAD), shape=(32, 4), formats=("bfloat16", "int8 (bitsandbytes LLM.int8)"),
                  head_bytes=1_152, embedding_bytes=256, companions=("lm_head.SCB",))
WHAT = (f"{HEAD} (int8 (bitsandbytes LLM.int8)) and {EMB} (bfloat16) are the output projection and the input "
        f"embedding, both [32, 4], stored in different formats: their values are not compared")


def row(names: tuple[str, str], declared: bool, *by: str) -> LayerRow:
    """A declared pair's row, as the declared layer makes it (its layers do not matter here)."""
    return LayerRow(names=names, declared=declared, by=by, physical="separate", stored="two copies", nbytes=0)


def test_tc022_without_a_declaration_is_info():
    (f,) = packed_head_findings([PAIR], [])
    assert (f.code, f.severity, f.names) == ("TC022", "info", (HEAD, EMB))  # findings sort their names
    assert f.message == (f"{WHAT}; if the model was tied before quantization, {HEAD} (with lm_head.SCB) is the "
                         f"embedding stored again: 1,152 bytes")


def test_tc022_names_who_declares_the_tie():
    broke = (f"{WHAT}: quantization broke the tie and the files store the embedding again as {HEAD} (with "
             f"lm_head.SCB), 1,152 bytes; a loader that re-ties replaces the quantized head by the embedding, one "
             f"that does not serves a head that differs from it")
    one = [row((EMB, HEAD), True, "config.json tie_word_embeddings")]
    (f,) = packed_head_findings([PAIR], one)
    assert f.severity == "warning"
    assert f.message == f"config.json tie_word_embeddings declares them tied, but {broke}"
    two = [row((HEAD, EMB), True, "config.json tie_word_embeddings", "the module")]
    (f,) = packed_head_findings([PAIR], two)
    assert f.message == f"config.json tie_word_embeddings and the module declare them tied, but {broke}"
    # A tie listed but not declared is no declaration.
    (f,) = packed_head_findings([PAIR], [row((EMB, HEAD), False, "x")])
    assert f.severity == "info"
