"""The content pass's figures (``report.content``) are the work it did, to the byte.

A planted mutation that left ``bytes_read`` at zero survived the rest of the suite: nothing
checked the figure the report prints as "read N of M". Three 64×64 float32 weights, two equal:
each is sampled once (four runs of 8 elements: 128 bytes), and the one pair whose samples agree is
compared in full (2 × 16 KiB).
"""

from __future__ import annotations

import torch
from torch import nn

import tiecheck
from tiecheck.loaders.content import RUN_ELEMENTS, SAMPLE_RUNS


def test_content_figures_count_the_samples_and_the_one_full_comparison():
    torch.manual_seed(0)
    model = nn.Module()
    model.a, model.b, model.c = (nn.Linear(64, 64, bias=False) for _ in range(3))
    with torch.no_grad():
        model.b.weight.copy_(model.a.weight)
    r = tiecheck.analyze(model)
    assert [list(d.names) for d in r.untied_duplicates] == [["a.weight", "b.weight"]]
    weight = 64 * 64 * 4
    sample = SAMPLE_RUNS * RUN_ELEMENTS * 4
    assert sample == 128
    # The transposed pass: b is a's duplicate (its first name stands for the group), so a and c are
    # the square 2-D tensors it looks at; their transposed samples differ, so nothing is compared in full.
    assert r.content.to_dict() == {"ran": True, "tensors": 3, "buckets": 1, "sampled": 3, "full_comparisons": 1,
                         "bytes_total": 3 * weight, "bytes_read": 3 * sample + 2 * weight,
                         "transposed": {"tensors": 2, "buckets": 1, "sampled": 4, "full_comparisons": 0,
                                        "bytes_read": 4 * sample, "copies": []}}
