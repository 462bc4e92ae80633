"""Reading tensor content for the duplicate pass, touching as few bytes as possible.

Tensors loaded with ``mmap=True`` are file-backed: every element read pulls a page from disk
into memory. Samples therefore read a few short runs of elements, and full comparisons go
chunk by chunk so peak memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

from typing import Mapping

import torch

SAMPLE_RUNS = 4  # short runs per tensor: first, last and two in between
RUN_ELEMENTS = 8
CHUNK_BYTES = 16 << 20

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits as integers, so NaNs compare equal and -0.0 differs from 0.0."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_INT_OF_SIZE[t.element_size()])


def _rows(t: torch.Tensor):
    """Yield contiguous chunks of whole rows, at most ~CHUNK_BYTES each (bounded memory).

    Chunks depend only on shape and dtype, so two tensors of equal shape but different
    layouts (one transposed, say) yield chunks that line up element for element.
    """
    if t.dim() == 0:
        yield t.reshape(1)
        return
    row_bytes = max(1, (t.numel() // max(1, t.shape[0])) * t.element_size())
    step = max(1, CHUNK_BYTES // row_bytes)
    for i in range(0, t.shape[0], step):
        yield t[i:i + step].contiguous().reshape(-1)


class TorchContentReader:
    """``ContentReader`` over a name -> tensor mapping; counts the bytes it reads."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors
        self.bytes_read = 0

    def sample(self, name: str) -> bytes:
        t = self.tensors[name]
        n = t.numel()
        if n <= SAMPLE_RUNS * RUN_ELEMENTS:
            idx = torch.arange(n)
        else:
            starts = torch.linspace(0, n - RUN_ELEMENTS, SAMPLE_RUNS).long()
            idx = (starts[:, None] + torch.arange(RUN_ELEMENTS)[None, :]).reshape(-1)
        if t.is_contiguous():
            vals = t.reshape(-1)[idx]
        else:
            vals = t[torch.unravel_index(idx, t.shape)] if t.dim() else t.reshape(1)
        self.bytes_read += idx.numel() * t.element_size()
        return _bits(vals.contiguous()).numpy().tobytes()

    def is_constant(self, name: str) -> bool:
        t = self.tensors[name]
        first = None
        with torch.no_grad():
            for chunk in _rows(t):
                bits = _bits(chunk)
                self.bytes_read += chunk.numel() * chunk.element_size()
                if first is None:
                    first = bits[:1]
                if not bool((bits == first).all()):
                    return False
        return True

    def equal(self, a: str, b: str) -> bool:
        ta, tb = self.tensors[a], self.tensors[b]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            return False
        with torch.no_grad():
            for ca, cb in zip(_rows(ta), _rows(tb)):
                self.bytes_read += 2 * ca.numel() * ca.element_size()
                if not torch.equal(_bits(ca), _bits(cb)):
                    return False
        return True
