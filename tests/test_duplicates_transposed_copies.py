"""The content pass finds 2-D tensors that hold another's transpose (a head stored as Eᵀ)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main
from tiecheck.loaders.content import WHOLE_BYTES, sample_index

from support.checkpoints import write_safetensors

V, D = 128, 16  # 8 KiB of float32: sampled by runs, not whole (WHOLE_BYTES)
assert V * D * 4 > WHOLE_BYTES


def sampled_positions(n: int) -> set[int]:
    return set(sample_index(n, 4))


def first_unsampled(n: int) -> int:
    return min(set(range(n)) - sampled_positions(n))


def tensors() -> dict:
    torch.manual_seed(0)
    emb = torch.randn(V, D)
    # Differs from emb.T in one element the samples never read: samples agree, content does not.
    near = emb.t().contiguous().clone()
    k = first_unsampled(V * D)
    near.view(-1)[k] += 1.0
    return {"emb.weight": emb, "head.weight": emb.t().contiguous(), "near": near,
            "other": torch.randn(D, V), "zeros_a": torch.zeros(4, 8), "zeros_b": torch.zeros(8, 4)}


@pytest.fixture(params=["safetensors", "torch.save"])
def target(request, tmp_path):
    if request.param == "safetensors":
        return write_safetensors(tmp_path / "m.safetensors", tensors())
    path = tmp_path / "m.pt"
    torch.save(tensors(), path)
    return path


def test_transposed_copy_is_found_and_near_copy_is_not(target):
    r = tiecheck.analyze(str(target))
    t = r.content.transposed
    assert [c.to_dict() for c in r.content.copies] == [{"names": ["head.weight", "emb.weight"], "shapes": [[D, V], [V, D]], "dtype": "float32",
                            "bytes_wasted": V * D * 4}]
    # head, near, other against emb (one pairing) and the zeros (another); near's and head's samples
    # agree with emb's, so both are compared in full; other's do not; the zeros are constant: never compared.
    assert (t.buckets, t.tensors, t.sampled, t.full_comparisons) == (2, 6, 6, 2)
    (f,) = [f for f in r.findings if f.code == "TC005"]
    assert list(f.names) == ["emb.weight", "head.weight"]
    assert f.severity == "warning"
    assert f.message.startswith(f"emb.weight [{V}, {D}] holds the transpose of head.weight [{D}, {V}]")
    assert "transposed copy" in f.message
    assert f"{V * D * 4:,} bytes wasted" in f.message
    assert r.summary.bytes_wasted_by_transposed_copies == V * D * 4
    assert r.summary.bytes_wasted_by_duplicates == 0
    assert r.untied_duplicates == ()


def test_samples_that_disagree_cost_no_full_read(tmp_path):
    torch.manual_seed(1)
    path = write_safetensors(tmp_path / "m.safetensors", {"a": torch.randn(V, D), "b": torch.randn(D, V)})
    content = tiecheck.analyze(str(path)).content
    assert (content.copies, content.transposed.full_comparisons) == ((), 0)
    assert content.transposed.bytes_read == 2 * len(sampled_positions(V * D)) * 4  # two samples, nothing else


def test_square_transposed_copy_but_not_a_symmetric_tensor(tmp_path):
    torch.manual_seed(2)
    w = torch.randn(8, 8)
    sym = w + w.t()
    path = write_safetensors(tmp_path / "m.safetensors", {"w": w, "wt": w.t().contiguous(), "sym": sym})
    r = tiecheck.analyze(str(path))
    assert [list(c.names) for c in r.content.copies] == [["w", "wt"]]
    assert [list(f.names) for f in r.findings if f.code == "TC005"] == [["w", "wt"]]


def test_duplicates_of_a_transposed_copy_are_reported_once_each_way(tmp_path):
    torch.manual_seed(3)
    emb = torch.randn(V, D)
    path = write_safetensors(tmp_path / "m.safetensors",
                             {"emb": emb, "emb_copy": emb.clone(), "head": emb.t().contiguous()})
    r = tiecheck.analyze(str(path))
    assert [list(d.names) for d in r.untied_duplicates] == [["emb", "emb_copy"]]
    assert [list(c.names) for c in r.content.copies] == [["head", "emb"]]


def test_rendered_with_what_was_compared(target):
    res = CliRunner().invoke(main, ["inspect", str(target), "--no-flops"])
    assert res.exit_code == 0, res.output
    assert "Transposed copies (1)" in res.output
    assert "compared 6 2-D tensors in 2 shape pairings (2 in full)" in res.output
    md = CliRunner().invoke(main, ["inspect", str(target), "--no-flops", "--format", "markdown"]).output
    assert "## Transposed copies (1)" in md
    js = json.loads(CliRunner().invoke(main, ["inspect", str(target), "--no-flops", "--format", "json"]).output)
    assert js["content_pass"]["transposed"]["copies"][0]["names"] == ["head.weight", "emb.weight"]


def test_no_duplicates_skips_the_transposed_pass_too(target):
    r = tiecheck.analyze(str(target), duplicates=False)
    assert r.content.transposed is None
    assert not [f for f in r.findings if f.code == "TC005"]


def test_constant_matrices_are_read_once_never_compared(tmp_path):
    # Three different constants in each of two swapped shapes: each (4, 8) constant has a (8, 4) twin
    # whose samples agree, but a constant equals any transpose of itself by construction.
    consts = {f"{s}{i}": torch.full(shape, float(i)) for i in (1, 2, 3) for s, shape in (("a", (4, 8)), ("b", (8, 4)))}
    content = tiecheck.analyze(str(write_safetensors(tmp_path / "c.safetensors", consts))).content
    t = content.transposed
    assert (content.copies, t.full_comparisons, t.tensors) == ((), 0, 6)
    # each tensor one sample (all its 32 elements); each (4, 8) one constant check (all 32 again), after
    # which no sample of the other side has a partner left: the (8, 4) ones are never checked.
    assert t.bytes_read == (6 * 32 + 3 * 32) * 4
