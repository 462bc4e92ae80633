"""Memory figures on hand-made facts: what is trainable, parameters without buffers, training bytes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tiecheck.analyses.memory import DtypeBytes, Unreachable, is_trainable, memory_summary, unreachable_bytes
from tiecheck.analyses.ties import find_tie_groups
from tiecheck.facts import TensorFact


def _fact(name: str, shape: tuple[int, ...], storage: int, *, role: str = "parameter", obj: int | None = None,
          requires_grad: bool = True, is_floating: bool = True, itemsize: int = 4, offset: int = 0,
          stride: tuple[int, ...] | None = None) -> TensorFact:
    if stride is None:
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    return TensorFact(name=name, shape=shape, stride=stride, dtype={4: "float32", 2: "bfloat16", 1: "uint8"}[itemsize],
                      itemsize=itemsize, device="cpu", storage=("cpu", storage), byte_start=offset * itemsize,
                      byte_end=(offset + span) * itemsize, obj_id=obj, role=role, requires_grad=requires_grad,
                      is_floating=is_floating)


@pytest.mark.parametrize(("role", "requires_grad", "is_floating", "expected"), [
    ("parameter", True, True, True),
    ("parameter", False, True, False),  # a frozen parameter
    ("buffer", True, True, False),  # a floating buffer (RoPE table) is not trained
    ("buffer", False, True, False),
    ("tensor", False, True, True),  # in a file, floating tensors are taken to be parameters
    ("tensor", False, False, False),  # integer tensors (position ids) are not
])
def test_is_trainable(role, requires_grad, is_floating, expected):
    f = _fact("x", (4,), 1, role=role, requires_grad=requires_grad, is_floating=is_floating)
    assert is_trainable(f) is expected


def test_live_module_parameters_leave_out_buffers_and_frozen_weights():
    facts = [_fact("w", (10,), 1, obj=1), _fact("frozen", (6,), 2, obj=2, requires_grad=False),
             _fact("rope", (8,), 3, role="buffer", obj=3)]
    m = memory_summary(facts, find_tie_groups(facts), "adamw")
    assert (m.params_unique, m.params_counted) == (16, 16)  # w and frozen; the buffer is bytes only
    assert (m.bytes_unique, m.bytes_counted) == (96, 96)
    # Training: w alone, 16 bytes per fp32 element under AdamW.
    assert (m.training_bytes, m.training_bytes_counted, m.training_bytes_saved) == (160, 160, 0)
    assert m.by_dtype == (DtypeBytes("float32", params_unique=16, params_counted=16, bytes_unique=96,
                                     bytes_counted=96),)


def test_a_buffer_tied_in_two_modules_is_not_a_parameter():
    # One RoPE table registered as a buffer by two modules: one memory, two names, no parameter.
    facts = [_fact("w", (10,), 1, obj=1), _fact("a.rope", (8,), 2, role="buffer", obj=2),
             _fact("b.rope", (8,), 2, role="buffer", obj=2)]
    m = memory_summary(facts, find_tie_groups(facts), "adamw")
    assert (m.params_unique, m.params_counted) == (10, 10)
    assert (m.bytes_unique, m.bytes_counted, m.bytes_saved) == (72, 104, 32)


def test_a_tied_parameter_beside_a_buffer_stays_a_parameter():
    # Something is dropped (the buffer), so the restricted index is rebuilt: the tied pair must stay in it.
    facts = [_fact("emb.weight", (10,), 1, obj=1), _fact("head.weight", (10,), 1, obj=1),
             _fact("rope", (8,), 2, role="buffer", obj=2)]
    m = memory_summary(facts, find_tie_groups(facts), "adamw")
    assert (m.params_unique, m.params_counted, m.params_saved) == (10, 20, 10)
    assert (m.training_bytes, m.training_bytes_counted, m.training_bytes_saved) == (160, 320, 160)


def test_one_memory_named_by_a_buffer_then_a_parameter():
    # A buffer that is the same bytes as a parameter, listed first: the memory is still a parameter's.
    facts = [_fact("cache.w", (10,), 1, role="buffer", obj=2), _fact("lin.w", (10,), 1, obj=1)]
    m = memory_summary(facts, find_tie_groups(facts), "adamw")
    assert (m.params_unique, m.params_counted, m.bytes_unique) == (10, 10, 40)


def test_overlapping_tensors_count_their_union_whatever_the_listing_order():
    # b (elements 8-23) listed before a (0-15): the union is 24 elements.
    facts = [_fact("b", (16,), 1, role="tensor", offset=8), _fact("a", (16,), 1, role="tensor")]
    m = memory_summary(facts, find_tie_groups(facts), "none")
    assert (m.bytes_unique, m.bytes_counted, m.bytes_nested_views) == (96, 128, 32)
    assert m.params_unique == 24


def test_a_view_listed_before_its_container_is_part_of_it():
    # A file holding a flat tensor and a view of its first 16 elements, the view listed first: the view
    # is one parameter with its container (one gradient), so its training bytes are not counted again.
    facts = [_fact("view", (4, 4), 1, role="tensor"), _fact("flat", (64,), 1, role="tensor")]
    m = memory_summary(facts, find_tie_groups(facts), "adamw")
    assert (m.bytes_unique, m.bytes_counted) == (256, 320)
    assert (m.training_bytes, m.training_bytes_nested_views, m.training_bytes_saved) == (1024, 256, 0)


def test_a_strided_view_counts_its_elements_not_its_span():
    # Column 0 of a 4 x 12 matrix that is not itself listed: 4 elements, spread over 37.
    facts = [_fact("col", (4,), 1, role="tensor", stride=(12,))]
    assert facts[0].byte_end - facts[0].byte_start == 148
    m = memory_summary(facts, [], "none")
    assert (m.bytes_unique, m.params_unique) == (16, 4)


def test_a_float_view_of_a_byte_buffer_is_trained_on_its_own():
    # A file storing a 128-byte uint8 buffer and a float32 view of its first 64 bytes: the buffer is not
    # trainable, so the view is no part of a trainable container and its training bytes count in full.
    facts = [_fact("buf", (128,), 1, role="tensor", itemsize=1, is_floating=False),
             _fact("w", (4, 4), 1, role="tensor")]
    m = memory_summary(facts, [], "adamw")
    assert (m.bytes_unique, m.bytes_counted) == (128, 192)
    assert (m.training_bytes, m.training_bytes_counted, m.training_bytes_nested_views) == (256, 256, 0)


def test_disjoint_tensors_of_one_storage_count_their_own_bytes():
    # Elements 0-15 and 32-47 of one storage (a memory-mapped file holds every tensor): 32 elements, no gap.
    facts = [_fact("a", (16,), 1, role="tensor"), _fact("b", (16,), 1, role="tensor", offset=32)]
    m = memory_summary(facts, [], "none")
    assert (m.bytes_unique, m.bytes_counted, m.bytes_nested_views) == (128, 128, 0)


def test_unreachable_bytes_per_storage():
    def with_storage(f: TensorFact, storage_bytes: int) -> TensorFact:
        return replace(f, storage_bytes=storage_bytes)

    facts = [with_storage(_fact("view", (10,), 1, role="tensor", offset=5), 400),  # elements 5-14 and 10-19 of
             with_storage(_fact("view2", (10,), 1, role="tensor", offset=10), 400),  # 100: 60 bytes reached
             with_storage(_fact("mapped", (10,), 2, role="tensor"), 4000),  # a whole file's mapping: skipped
             _fact("unknown", (10,), 3, role="tensor")]  # storage size unknown: nothing to say
    (u,) = unreachable_bytes(facts, skip={"mapped"})
    assert u == Unreachable(names=("view", "view2"), storage_bytes=400, reachable_bytes=60)
    assert u.unreachable_bytes == 340


def test_a_parameter_whose_bytes_a_buffer_also_names_is_trained_once():
    # The parameter listed first, a buffer over the same bytes second: one gradient, one optimizer state.
    facts = [_fact("lin.w", (10,), 1, obj=1), _fact("cache.w", (10,), 1, role="buffer", obj=2)]
    m = memory_summary(facts, find_tie_groups(facts), "adamw")
    assert (m.training_bytes, m.training_bytes_counted, m.training_bytes_saved) == (160, 160, 0)


def test_per_dtype_rows_of_a_dtype_without_parameters_or_own_bytes():
    # A bf16 buffer: a dtype with bytes and no parameters.
    facts = [_fact("w", (10,), 1, obj=1), _fact("table", (8,), 2, role="buffer", obj=2, itemsize=2)]
    rows = {r.dtype: r for r in memory_summary(facts, [], "none").by_dtype}
    assert rows["bfloat16"] == DtypeBytes("bfloat16", params_unique=0, params_counted=0, bytes_unique=16,
                                          bytes_counted=16)
    # A bf16 view of a float32 tensor's first 16 bytes, in a file: its bytes belong to the container.
    facts = [_fact("flat", (16,), 1, role="tensor"), _fact("half", (8,), 1, role="tensor", itemsize=2)]
    rows = {r.dtype: r for r in memory_summary(facts, [], "none").by_dtype}
    assert rows["bfloat16"] == DtypeBytes("bfloat16", params_unique=0, params_counted=8, bytes_unique=0,
                                          bytes_counted=16)
    assert rows["float32"].bytes_unique == 64


def test_a_chain_of_overlaps_counts_its_union():
    # Elements 0-15, 8-23 and 20-31: each overlaps the one before; the union is 0-31.
    facts = [_fact("a", (16,), 1, role="tensor"), _fact("b", (16,), 1, role="tensor", offset=8),
             _fact("c", (12,), 1, role="tensor", offset=20)]
    m = memory_summary(facts, [], "none")
    assert (m.bytes_unique, m.bytes_counted, m.bytes_nested_views) == (128, 176, 48)
