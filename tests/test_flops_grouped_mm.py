"""``aten::_grouped_mm``'s FLOPs handle, each operand-rank branch against the products torch runs.

torch's FlopCounterMode has no formula for ``_grouped_mm``, so the reference is the same products
written as the ops it does count (``bmm``, one ``mm`` per group), after checking that the grouped
call gives their values.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tiecheck.flops import count_flops

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)

G, M, K, N = 3, 24, 16, 8  # bf16 strides must be multiples of 16 bytes: K and N multiples of 8; M != K
BF16 = torch.bfloat16


class Grouped(torch.nn.Module):
    def __init__(self, w: torch.Tensor, offs: torch.Tensor | None):
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.offs = offs

    def forward(self, x):
        return torch._grouped_mm(x, self.w, offs=self.offs)


def _groups(offs: torch.Tensor) -> list[slice]:
    bounds = [0, *offs.tolist()]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _case(kind: str, g: torch.Generator):
    """(a, b, offs, the reference products as a function of float operands)."""
    def r(*shape):
        return torch.randn(*shape, generator=g).to(BF16)

    if kind == "3-D x 3-D":  # a batch of G products
        return r(G, M, K), r(G, K, N), None, lambda a, b: torch.bmm(a, b)
    if kind == "2-D x 3-D":  # rows split into groups, each through its own (K, N)
        offs = torch.tensor([4, 10, 16], dtype=torch.int32)
        return r(16, K), r(G, K, N), offs, lambda a, b: torch.cat([a[s] @ b[i] for i, s in enumerate(_groups(offs))])
    if kind == "3-D x 2-D":  # columns split into groups
        offs = torch.tensor([8, 16, 24], dtype=torch.int32)
        return r(G, M, K), r(K, 24), offs, lambda a, b: torch.cat([a[i] @ b[:, s] for i, s in
                                                                     enumerate(_groups(offs))], dim=1)
    offs = torch.tensor([8, 16, 24], dtype=torch.int32)  # 2-D x 2-D: K split into groups
    return r(M, 24), r(N, 24).t(), offs, lambda a, b: torch.stack([a[:, s] @ b[s] for s in _groups(offs)])


@pytest.mark.parametrize("kind", ["3-D x 3-D", "2-D x 3-D", "3-D x 2-D", "2-D x 2-D"])
def test_each_operand_rank_counts_the_products_torch_runs(kind):
    a, b, offs, reference = _case(kind, torch.Generator().manual_seed(0))
    got = torch._grouped_mm(a, b, offs=offs)
    want = reference(a.float(), b.float())
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.02)
    with FlopCounterMode(display=False) as fc:
        reference(a.float(), b.float())
    counted = count_flops(Grouped(b, offs), inputs=a, device="cpu")
    assert counted.available, counted.reason
    assert counted.by_operator == {"_grouped_mm": fc.get_total_flops()}
    assert counted.forward == fc.get_total_flops()
