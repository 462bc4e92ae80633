"""The content pass reads a torch.save tensor by pread only where its bytes are one contiguous run:
views torch.save writes with their whole storage (every other element, a column) are read through
their strides, and compared by the values torch.load gives them."""

from __future__ import annotations

import pytest
import torch

import tiecheck
import tiecheck.loaders
from tiecheck.loaders.tensor_facts import fact_of


def _duplicates(report) -> list[tuple[str, ...]]:
    return sorted(g.names for g in report.untied_duplicates)


@pytest.mark.parametrize("view", ["every other element", "a column"])
def test_a_strided_view_is_compared_by_its_values(tmp_path, view):
    """``v`` holds [0, 2] through a stride of 2 over a storage of [0, 1, 2, 3]; ``u`` is [0, 1], the
    storage's first two values, ``w`` is [0, 2]: v equals w, not u."""
    base = torch.arange(4.0)
    v = base[::2] if view == "every other element" else base.view(2, 2)[:, 0]
    path = tmp_path / "views.pt"
    torch.save({"v": v, "u": torch.tensor([0.0, 1.0]), "w": torch.tensor([0.0, 2.0])}, path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    assert loaded["v"].stride() == (2,)
    assert loaded["v"].untyped_storage().nbytes() == 16  # the whole storage, as torch.save writes a view
    assert torch.equal(loaded["v"], loaded["w"])
    assert _duplicates(tiecheck.analyze(str(path))) == [("v", "w")]
    sub = tiecheck.loaders.load_path(path)
    assert sub.tensors.file_layout("v") is None  # not one contiguous run: read through the tensor
    assert sub.tensors.file_layout("w") == (0, 8, 4)


def test_a_contiguous_block_after_an_offset_is_read_from_its_first_element(tmp_path):
    """Rows 1-2 of a (4, 2) tensor: contiguous, starting 2 elements into the storage."""
    base = torch.arange(8.0).view(4, 2)
    path = tmp_path / "rows.pt"
    torch.save({"rows": base[1:3], "same": torch.tensor([[2.0, 3.0], [4.0, 5.0]]),
                "head": torch.tensor([[0.0, 1.0], [2.0, 3.0]])}, path)
    assert _duplicates(tiecheck.analyze(str(path))) == [("rows", "same")]
    assert tiecheck.loaders.load_path(path).tensors.file_layout("rows") == (8, 16, 4)


def test_a_complex32_tensor_is_made_with_torchs_values(tmp_path):
    """complex32, the dtype torch warns about when a tensor of it is made: the reader makes it (its
    warning already a note of the load) with the values torch.load gives, through its strides too."""
    base = torch.arange(8.0).view(4, 2).to(torch.complex32)
    path = tmp_path / "c32.pt"
    torch.save({"c": base, "col": base[:, 0]}, path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    sub = tiecheck.loaders.load_path(path)
    for name in ("c", "col"):
        got = sub.tensors[name]
        assert (got.dtype, got.shape, got.stride()) == (torch.complex32, loaded[name].shape, loaded[name].stride())
        assert torch.equal(got.view(torch.int32), loaded[name].view(torch.int32))


def test_the_facts_of_nested_names_are_those_of_the_tensors_made(tmp_path):
    """A module's tensors two levels down: each fact, made from its record, is the fact of the
    tensor made from it (owner ``model.layers.0`` for ``model.layers.0.weight``)."""
    w = torch.arange(6.0).view(2, 3)
    path = tmp_path / "nested.pt"
    torch.save({"model.layers.0.weight": w, "model.layers.0.bias": w[:, 1], "scale": torch.ones(1)}, path)
    tensors = tiecheck.loaders.load_path(path).tensors
    facts = tensors.facts()
    assert facts == [fact_of(n, t) for n, t in tensors.items()]
    assert [f.owner for f in facts] == ["model.layers.0", "model.layers.0", ""]
