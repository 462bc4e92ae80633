"""Matching tensors across formats (``tiecheck diff``): whether one tensor holds another's values,
byte for byte, through a transpose, or through a lossless dtype conversion.

Read in row blocks, as the content pass reads (``content.py``, whose chunking and raw-bit views
this module shares), so memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import torch

from tiecheck.loaders.content import CHUNK_BYTES, RUN_ELEMENTS, _bits, _broadcast_dims, _narrowed, _overlapping, _rows

_WIDE = {True: torch.float64, False: torch.int64}


def _common(ta: torch.Tensor, tb: torch.Tensor) -> torch.dtype | None:
    """A dtype both convert to without loss, when their dtypes differ: float64 for floats up to
    float32 (and float64 itself), int64 for signed and small unsigned integers; else None."""
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    ints = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32)
    if ta.dtype in floats and tb.dtype in floats:
        return torch.float64
    if ta.dtype in ints and tb.dtype in ints:
        return torch.int64
    return None


def _same(ca: torch.Tensor, cb: torch.Tensor, wide: torch.dtype | None) -> bool:
    if wide is None:
        return torch.equal(_bits(ca.contiguous()), _bits(cb.contiguous()))
    return torch.equal(ca.to(wide), cb.to(wide))


def _ends_agree(ta: torch.Tensor, tb: torch.Tensor, wide) -> bool:
    """The first and last few elements agree: most pairs of one size differ there at once, and a
    full comparison starts with a block of up to 16 MiB (``diff`` across formats tries many pairs)."""
    if not (ta.is_contiguous() and tb.is_contiguous()):
        return True  # a view of a view: let the block comparison decide
    fa, fb = ta.reshape(-1), tb.reshape(-1)
    k = min(RUN_ELEMENTS, fa.numel())
    return _same(fa[:k], fb[:k], wide) and _same(fa[-k:], fb[-k:], wide)


def value_match(ta: torch.Tensor, tb: torch.Tensor) -> str | None:
    """How ``tb`` holds ``ta``'s values: "exact bytes", "transpose", either with a lossless dtype
    conversion ("exact values, float32→float16"), or None. Read in row blocks (bounded memory)."""
    if ta.numel() != tb.numel() or ta.numel() == 0 or "meta" in (ta.device.type, tb.device.type):
        return None
    wide = None if ta.dtype == tb.dtype else _common(ta, tb)
    if ta.dtype != tb.dtype and wide is None:
        return None
    conv = "" if wide is None else f", {str(ta.dtype)[6:]}→{str(tb.dtype)[6:]} lossless"
    if any(_broadcast_dims(t) or _overlapping(t) for t in (ta, tb)):
        # Views repeating stored elements: compared once per stored element, same layout only.
        if tuple(ta.shape) != tuple(tb.shape) or _broadcast_dims(ta) != _broadcast_dims(tb):
            return None
        ta, tb = _narrowed(ta, _broadcast_dims(ta)), _narrowed(tb, _broadcast_dims(tb))
        if _overlapping(ta) or _overlapping(tb):
            return None
        with torch.no_grad():
            if all(_same(ca, cb, wide) for ca, cb in zip(_rows(ta), _rows(tb), strict=True)):
                return ("exact bytes" if wide is None else "exact values") + conv
        return None
    with torch.no_grad():
        if tuple(ta.shape) == tuple(tb.shape) and _ends_agree(ta, tb, wide) and \
                all(_same(ca, cb, wide) for ca, cb in zip(_rows(ta), _rows(tb), strict=True)):
            return ("exact bytes" if wide is None else "exact values") + conv
        if ta.dim() == 2 and tuple(tb.shape) == tuple(ta.shape)[::-1] and ta.shape[0]:
            rows, cols = ta.shape
            if not _same(ta[:1].reshape(-1), tb[:, :1].reshape(-1), wide):
                return None
            step = max(1, CHUNK_BYTES // max(1, cols * ta.element_size()))
            if all(_same(ta[i:i + step], tb[:, i:i + step].t(), wide) for i in range(0, rows, step)):
                return "transpose" + conv
    return None
