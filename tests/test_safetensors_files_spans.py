"""A safetensors file's spans (``Subject.file_spans``) are one mapping over its header, not a dict of
a span per name: it must say exactly what that dict said, name for name, as restored aliases join it."""

from __future__ import annotations

import torch

from tiecheck.loaders import load_target
from tiecheck.loaders.fileview import FileSpan

from support.checkpoints import write_safetensors


def _as_dict(spans) -> dict:
    return {n: spans[n] for n in spans}


def test_spans_are_the_stored_tensors_with_data(tmp_path):
    tensors = {"a": torch.ones(3), "empty": torch.zeros(0), "b": torch.arange(5, dtype=torch.float16),
               "c": torch.ones(2, 2, dtype=torch.float64)}
    # pad_to=1: the header's length leaves data unaligned for some dtypes, whose tensors are copied
    path = write_safetensors(tmp_path / "m.safetensors", tensors, pad_to=1)
    sub = load_target(str(path))
    spans = sub.file_spans
    copied = {n for n in tensors if sub.tensors.file_layout(n)[0] % sub.tensors.file_layout(n)[2]}
    assert copied  # the case is exercised
    want = {n: FileSpan(str(path), 0) for n, t in tensors.items() if t.numel() and n not in copied}
    assert _as_dict(spans) == want
    assert len(spans) == len(want)
    assert set(spans) == set(want)
    assert "empty" not in spans
    assert spans.get("empty") is None
    assert spans.get("nothing", 7) == 7
    for n in copied:
        assert n not in spans


def test_restored_aliases_join_the_spans(tmp_path):
    w = torch.randn(4, 4)
    path = write_safetensors(tmp_path / "m.safetensors", {"emb.weight": w, "other": torch.ones(2)},
                             metadata={"head.weight": "emb.weight"})
    sub = load_target(str(path))
    assert sub.file_spans["head.weight"] == sub.file_spans["emb.weight"]
    assert set(sub.file_spans) == {"emb.weight", "other", "head.weight"}
    assert len(sub.file_spans) == 3
