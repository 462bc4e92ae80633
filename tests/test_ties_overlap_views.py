"""find_overlaps on views whose byte ranges intersect: the element-level answer, checked against torch.

Each view is cut from one base tensor whose values are their own element indexes, so the elements
two views share are read off their values: an answer independent of the offsets the analysis computes.
"""

from __future__ import annotations

import math

import pytest
import torch

from tiecheck.analyses.ties import _EXACT_LIMIT, Overlap, find_overlaps, tie_findings
from tiecheck.facts import TensorFact, span_elements
from tiecheck.loaders.tensor_facts import fact_of

BASE = torch.arange(96, dtype=torch.float32)
GRID = BASE.view(8, 12)

# name -> (view a, view b): strided, non-dense views whose byte ranges intersect.
PAIRS = {
    # Columns 0-3 and 2-5 of each row: columns 2 and 3 are shared, yet the views start at different bytes.
    "overlapping column blocks": (GRID[:, 0:4], GRID[:, 2:6]),
    # Columns 0-3 and 4-7: byte ranges interleave, no element is shared (a fused QKV's column slices).
    "interleaved column blocks": (GRID[:, 0:4], GRID[:, 4:8]),
    # Even and odd elements: no element shared.
    "even and odd elements": (BASE[0::2], BASE[1::2]),
    # Every 2nd from 0 and every 3rd from 3: 6, 12, 18 ... shared.
    "every 2nd and every 3rd": (BASE[0::2], BASE[3::3]),
    # A transposed column block against rows 1-2: shared where they cross.
    "transposed block and two rows": (GRID[:, 1:3].t(), GRID[1:3, :].reshape(2, 12)[:, 1::5]),
    # A dense run (elements 2, 3) between the elements of a stride-4 view (0, 4, 8): only one of the two is dense.
    "dense run between strided elements": (BASE[0:12:4], BASE[2:4]),
    # A dense row crossing a column: element 17 shared.
    "column and a dense row": (GRID[:, 5], GRID[1]),
    # One element broadcast three times (stride 0, offsets 5, 5, 5) against the even elements: an offset
    # repeated within one view is not an element the two share.
    "broadcast element and even elements": (BASE[0:12:2], BASE[5:6].expand(3)),
}


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(set(a.flatten().tolist()) & set(b.flatten().tolist()))


@pytest.mark.parametrize("case", list(PAIRS))
def test_strided_views_overlap_exactly_when_they_share_an_element(case):
    a, b = PAIRS[case]
    facts = [fact_of("a", a), fact_of("b", b)]
    assert not facts[0].dense or not facts[1].dense
    assert facts[0].byte_start < facts[1].byte_end
    assert facts[1].byte_start < facts[0].byte_end
    expected = [Overlap(a=("a",), b=("b",), kind="partial", exact=True)] if _shares(a, b) else []
    assert find_overlaps(facts) == expected


def test_the_cases_hold_both_answers():
    # The oracle itself: both answers occur, and the first pair shares elements without starting at the same byte.
    assert [_shares(*PAIRS[c]) for c in PAIRS] == [True, False, False, True, True, False, True, False]
    assert fact_of("a", PAIRS["overlapping column blocks"][0]).byte_start \
        != fact_of("b", PAIRS["overlapping column blocks"][1]).byte_start


S = ("cpu", 0x1000)


def _fact(name: str, shape: tuple[int, ...], stride: tuple[int, ...] | None = None, offset: int = 0,
          itemsize: int = 4) -> TensorFact:
    if stride is None:  # contiguous
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return TensorFact(name=name, shape=shape, stride=stride, dtype="float32" if itemsize == 4 else "float16",
                      itemsize=itemsize, device="cpu", storage=S, byte_start=offset * itemsize,
                      byte_end=(offset + span_elements(shape, stride)) * itemsize)


def test_three_mutually_intersecting_extents_give_three_pairs():
    facts = [_fact("a", (16,)), _fact("b", (16,), offset=4), _fact("c", (16,), offset=8)]
    assert find_overlaps(facts) == [Overlap(a=("a",), b=("b",), kind="partial", exact=True),
                                    Overlap(a=("a",), b=("c",), kind="partial", exact=True),
                                    Overlap(a=("b",), b=("c",), kind="partial", exact=True)]


def test_dense_partial_overlap_is_exact_and_unqualified():
    (o,) = find_overlaps([_fact("a", (16,)), _fact("b", (16,), offset=8)])
    assert o == Overlap(a=("a",), b=("b",), kind="partial", exact=True)
    (f,) = tie_findings([], [o])
    assert f.code == "TC003"
    assert f.message == "a and b partially overlap"


def test_dense_extents_past_the_exact_limit_are_still_exact():
    # Two dense extents need no element enumeration, however large: the answer stays exact.
    n = _EXACT_LIMIT + 8
    (o,) = find_overlaps([_fact("a", (n,)), _fact("b", (n,), offset=8)])
    assert o == Overlap(a=("a",), b=("b",), kind="partial", exact=True)


@pytest.mark.parametrize("large_first", [True, False])
def test_strided_extent_past_the_exact_limit_is_conservative(large_first):
    # A strided view of more than _EXACT_LIMIT elements is not enumerated: reported as an overlap, not exact.
    # Elements i + 3j: gaps, so not dense. The small view shares elements with it when the large one starts
    # first, none when the small one does: an exact check would tell these apart; the conservative answer does not.
    large = _fact("large", (2, _EXACT_LIMIT // 2 + 1), stride=(1, 3), offset=0 if large_first else 1)
    small = _fact("small", (4,), stride=(3,), offset=1 if large_first else 0)
    facts = [large, small]
    first, second = sorted(facts, key=lambda f: f.byte_start)
    assert (first.name == "large") == large_first
    (o,) = find_overlaps(facts)
    assert o == Overlap(a=(first.name,), b=(second.name,), kind="partial", exact=False)
    (f,) = tie_findings([], [o])
    assert f.message.endswith("partially overlap (byte ranges intersect; too large to check element by element)")


def test_views_of_different_item_sizes_are_conservative():
    # A float32 column block and a float16 strided view over the same bytes: element indexes of the
    # two sizes are not comparable, so the overlap is reported without an exact check.
    a = _fact("a", (4, 4), stride=(12, 1))
    b = _fact("b", (4,), stride=(24,), offset=9, itemsize=2)  # starts halfway into a's row 0, past column 3
    (o,) = find_overlaps([a, b])
    assert o == Overlap(a=("a",), b=("b",), kind="partial", exact=False)


def test_the_element_check_stops_at_four_million_elements():
    # 2**22 elements is where enumerating offsets (8 bytes each, sorted) stops being cheap: one element
    # more and the overlap is reported without the element check, whatever the other view.
    assert _EXACT_LIMIT == 4_194_304
    large = _fact("large", (2, 2_097_153), stride=(1, 3))  # 4,194,306 elements, not dense
    small = _fact("small", (4,), stride=(3,), offset=1)
    (o,) = find_overlaps([large, small])
    assert o == Overlap(a=("large",), b=("small",), kind="partial", exact=False)
