"""Untied duplicates are never invented: equal samples are not equal content.

The content pass samples each tensor (``SAMPLE_RUNS`` runs of ``RUN_ELEMENTS`` elements) and
compares in full only the pairs whose samples agree. Each pair here agrees on every sampled
element and differs at one element between the runs, so only the full comparison can tell them
apart. The pairs go through the real loaders and ``TorchContentReader``: from a safetensors file
(contiguous, read with pread at file offsets), from a torch.save file holding transposed views
(not contiguous: compared in memory, chunk by chunk) and from an in-memory module.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tiecheck
from tiecheck.loaders.content import RUN_ELEMENTS, SAMPLE_RUNS, _sample_starts

from support.checkpoints import write_safetensors

SHAPE = (64, 48)
N = SHAPE[0] * SHAPE[1]


def _unsampled() -> int:
    """A flat index no sample run covers (the test is void if the samples cover it)."""
    covered = {s + i for s in _sample_starts(N) for i in range(RUN_ELEMENTS)}
    assert len(covered) == SAMPLE_RUNS * RUN_ELEMENTS  # four separate runs: the sampled path is taken
    return next(i for i in range(N // 3, N) if i not in covered)


def _pair(differ: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(SHAPE, generator=g)
    b = a.clone()
    if differ:
        b.view(-1)[_unsampled()] += 1.0
    return a, b


def _safetensors(tmp_path, a, b):
    return str(write_safetensors(tmp_path / "pair.safetensors", {"x.weight": a, "y.weight": b}))


def _torch_save_transposed(tmp_path, a, b):
    # Saved as transposed views of separate storages: loaded with the same strides, not contiguous.
    path = tmp_path / "pair.pt"
    torch.save({"x.weight": a.t().contiguous().t(), "y.weight": b.t().contiguous().t()}, path)
    loaded = torch.load(path, weights_only=True)
    assert not loaded["x.weight"].is_contiguous()
    assert torch.equal(loaded["y.weight"], b)
    return str(path)


def _module(_tmp_path, a, b):
    m = nn.Module()
    m.x = nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    m.y = nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    with torch.no_grad():
        m.x.weight.copy_(a)
        m.y.weight.copy_(b)
    return m


SOURCES = {"safetensors (pread)": _safetensors, "torch.save transposed (in memory)": _torch_save_transposed,
           "module (in memory)": _module}


@pytest.mark.parametrize("source", list(SOURCES))
def test_equal_samples_different_content_is_not_a_duplicate(tmp_path, source):
    a, b = _pair(differ=True)
    r = tiecheck.analyze(SOURCES[source](tmp_path, a, b))
    assert r.untied_duplicates == ()
    assert "TC005" not in {f.code for f in r.findings}
    # The samples agreed, so the pair reached the full comparison: only it can have told them apart.
    assert r.content.stats.full_comparisons == 1


@pytest.mark.parametrize("source", list(SOURCES))
def test_equal_content_is_a_duplicate(tmp_path, source):
    a, b = _pair(differ=False)
    r = tiecheck.analyze(SOURCES[source](tmp_path, a, b))
    names = ["x.weight", "y.weight"]
    assert [list(d.names) for d in r.untied_duplicates] == [names]
    assert r.untied_duplicates[0].bytes_wasted == N * 4
    assert [list(f.names) for f in r.findings if f.code == "TC005"] == [names]
    assert r.content.stats.full_comparisons == 1
