"""The FLOPs handles' arithmetic read directly: the multiply-adds of a product against torch's own
``FlopCounterMode`` (2 FLOPs per multiply-add, as tiecheck counts), the op tables' lookups, and the
warnings fvcore's import would print."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tiecheck.flops import count_flops, handles
from tiecheck.flops.handles import IGNORED, NO_ARITHMETIC, in_table

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)


def _torch_flops(fn, *shapes) -> int:
    """FLOPs torch counts for ``fn`` on tensors of ``shapes``."""
    tensors = [torch.ones(s) for s in shapes]
    with FlopCounterMode(display=False) as fc:
        fn(*tensors)
    return fc.get_total_flops()


def test_only_aten_ops_are_looked_up_and_an_in_place_op_counts_as_its_op():
    assert in_table("aten::add", IGNORED)
    assert in_table("aten::add_", IGNORED)  # add_ is add, in place
    assert in_table("prim::add", IGNORED) is False  # a TorchScript primitive of the same name is no aten op
    assert not in_table("aten::linear", IGNORED)
    assert in_table("aten::view", NO_ARITHMETIC)


def test_a_dot_product_and_a_matrix_vector_product_by_hand():
    # FlopCounterMode has no formula for aten::dot and aten::mv (it counts them 0): n, and m x n.
    assert handles._matmul_macs([5], [5]) == 5
    assert handles._matmul_macs([4, 5], [5]) == 20
    # An operand without dimensions (a shape the trace gave as a scalar) is no product.
    assert handles._matmul_macs([], [5]) == 0
    assert handles._matmul_macs([4, 5], []) == 0


@pytest.mark.parametrize(("a", "b"), [
    ((5,), (5, 3)),  # a vector times a matrix
    ((4, 5), (5, 3)),
    ((2, 4, 5), (5, 3)),
    ((5,), (2, 5, 3)),
    ((2, 1, 4, 5), (3, 5, 6)),  # broadcast batch: (2, 3)
    ((3, 4, 5), (2, 1, 5, 6)),
])
def test_matmul_multiply_adds_are_torchs(a, b):
    assert 2 * handles._matmul_macs(list(a), list(b)) == _torch_flops(torch.matmul, a, b)


def test_broadcast_is_numpys():
    assert handles._broadcast([2, 1], [3, 1, 4]) == [3, 2, 4]
    assert handles._broadcast([], [3]) == [3]
    assert handles._broadcast([5], []) == [5]


@pytest.mark.parametrize(("equation", "shapes"), [
    ("ij,jk->ik", [(4, 5), (5, 3)]),
    ("bij,bjk->bik", [(2, 4, 5), (2, 5, 3)]),
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 8), (2, 3, 6, 8)]),
    ("...ij,...jk->...ik", [(2, 3, 4, 5), (2, 3, 5, 6)]),
    ("ij,jk", [(4, 5), (5, 3)]),  # implicit output: the indices that appear once
    ("i,i->", [(7,), (7,)]),
])
def test_two_operand_einsums_are_torchs(equation, shapes):
    assert 2 * handles._einsum_macs(equation, shapes) == \
        _torch_flops(lambda *t: torch.einsum(equation, *t), *shapes)


def test_an_einsum_of_three_operands_contracts_left_to_right():
    # (4x5)(5x3) first: 60 multiply-adds, leaving 4x3; then (4x3)(3x2): 24.
    assert handles._einsum_macs("ij,jk,kl->il", [(4, 5), (5, 3), (3, 2)]) == 60 + 24
    # The implicit output (i and l, each once) keeps i through the second product, as the explicit one does.
    assert handles._einsum_macs("ij,jk,kl", [(4, 5), (5, 3), (3, 2)]) == 60 + 24
    # An explicit empty output keeps nothing: the second product is only (3x2), 6.
    assert handles._einsum_macs("ij,jk,kl->", [(4, 5), (5, 3), (3, 2)]) == 60 + 6
    # An ellipsis in the output keeps the batch (2) through the second product: 120, then 48.
    assert handles._einsum_macs("...ij,jk,kl->...il", [(2, 4, 5), (5, 3), (3, 2)]) == 120 + 48
    assert handles._einsum_macs("ij->ji", [(4, 5)]) == 0  # one operand: a permutation, no product
    with pytest.raises(ValueError, match="2 terms for 3 operands"):
        handles._einsum_macs("ij,jk->ik", [(4, 5), (5, 3), (3, 2)])


def test_triangular_solves_cost_n_n_minus_1_over_2_per_column():
    # A 6x6 triangle and 4 right-hand columns, batched by 2 (on either side, or both): 2 x 15 x 4.
    assert handles._solve_triangular_macs([[2, 6, 6], [2, 6, 4]], []) == 2 * 15 * 4
    assert handles._solve_triangular_macs([[2, 6, 6], [6, 4]], []) == 2 * 15 * 4
    assert handles._solve_triangular_macs([[6, 6], [2, 6, 4]], []) == 2 * 15 * 4


def test_errors_are_described_on_one_line():
    assert handles.describe_error(ValueError("first line\nsecond")) == "ValueError: first line"
    assert handles.describe_error(RuntimeError("")) == "RuntimeError"
    assert handles.describe_error(KeyError("x" * 400)) == "KeyError: '" + "x" * 299


def test_fvcores_import_prints_no_deprecation_warning():
    """Importing fvcore.nn scripts a few loss functions, which torch deprecates: the module silences it."""
    saved = {n: m for n, m in sys.modules.items() if n == "tiecheck.flops.handles" or n.startswith("fvcore.nn")}
    for n in saved:
        del sys.modules[n]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import tiecheck.flops.handles  # noqa: F401, PLC0415 - imported afresh to see its warnings
        assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
    finally:
        # Put back the modules the rest of the session holds, and their parents' attributes.
        sys.modules.update(saved)
        for name, module in saved.items():
            parent, _, attr = name.rpartition(".")
            setattr(sys.modules[parent], attr, module)


def test_the_session_keeps_its_modules_after_the_fresh_import():
    from tiecheck import flops  # noqa: PLC0415 - the package attribute the import above rebinds

    assert flops.handles is sys.modules["tiecheck.flops.handles"] is handles


class _Op(torch.nn.Module):
    """One op on the input and a weight, as a model would call it."""

    def __init__(self, fn, *weights):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.ParameterList([torch.nn.Parameter(w) for w in weights])

    def forward(self, x):
        return self.fn(x, *self.w)


@pytest.mark.parametrize(("op", "fn", "x", "weights"), [
    ("addmm", lambda x, b, w: torch.addmm(b, x, w), (4, 5), [(3,), (5, 3)]),
    ("baddbmm", lambda x, b, w: torch.baddbmm(b, x, w), (2, 4, 5), [(2, 4, 3), (2, 5, 3)]),
    ("einsum", lambda x, w: torch.einsum("bij,jk->bik", x, w), (2, 4, 5), [(5, 3)]),
])
def test_products_after_a_bias_and_einsums_count_as_torch_counts_them(op, fn, x, weights):
    """addmm & co take (bias, a, b): the product is of the second and third inputs."""
    model = _Op(fn, *(torch.randn(s) for s in weights))
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(x))
    counted = count_flops(model, inputs=torch.randn(x), device="cpu")
    assert counted.available, counted.reason
    assert counted.by_operator == {op: fc.get_total_flops()}


def test_addbmm_addmv_and_a_triangular_solve_count_by_hand():
    # FlopCounterMode has no formula for these: b x m x k x n for addbmm, m x n for addmv, n(n-1)/2 per
    # column for the solve.
    bmm = count_flops(_Op(lambda x, b, w: torch.addbmm(b, x, w), torch.randn(4, 3), torch.randn(2, 5, 3)),
                      inputs=torch.randn(2, 4, 5), device="cpu")
    assert bmm.by_operator == {"addbmm": 2 * 2 * 4 * 5 * 3}
    mv = count_flops(_Op(lambda x, b, w: torch.addmv(b, w, x), torch.randn(4), torch.randn(4, 5)),
                     inputs=torch.randn(5), device="cpu")
    assert mv.by_operator == {"addmv": 2 * 4 * 5}
    tri = torch.triu(torch.randn(6, 6)) + 6 * torch.eye(6)
    solve = count_flops(_Op(lambda x, a: torch.linalg.solve_triangular(a, x, upper=True), tri),
                        inputs=torch.randn(6, 4), device="cpu")
    assert solve.by_operator == {"linalg_solve_triangular": 2 * 15 * 4}


def test_a_grouped_mm_of_unexpected_ranks_is_refused():
    with pytest.raises(ValueError, match="grouped_mm: unexpected operand ranks 4, 1"):
        handles._grouped_mm_macs([[2, 2, 2, 2], [3]], [])


@pytest.mark.parametrize(("conv", "x"), [
    (torch.nn.Conv1d(4, 6, 3, padding=1), (2, 4, 10)),
    (torch.nn.Conv2d(3, 5, 3, stride=2), (1, 3, 9, 9)),
    (torch.nn.ConvTranspose2d(3, 5, 3, stride=2), (1, 3, 5, 5)),
])
def test_convolutions_count_as_torch_counts_them(conv, x):
    with FlopCounterMode(display=False) as fc:
        conv(torch.randn(x))
    counted = count_flops(conv, inputs=torch.randn(x), device="cpu")
    assert counted.available, counted.reason
    assert counted.by_operator == {"convolution": fc.get_total_flops()}


def test_a_token_mixer_counts_as_attention_unless_it_is_an_mlp():
    """State-space and linear-recurrent layers name their token mixer ``mixer``, ``mamba``, ``ssm`` or
    ``temporal_block``; a feed-forward block under such a name (an MLP, MoE or experts class) is not one."""

    class Scan(torch.nn.Module):
        pass

    class GatedMLP(torch.nn.Module):
        pass

    class Block(torch.nn.Module):
        def __init__(self, mixer: torch.nn.Module):
            super().__init__()
            self.mixer = mixer

    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList([Block(Scan()), Block(GatedMLP())])
    cls = handles.Classifier(root, "", 1, None, "decoder", "full")
    assert cls.attention_names == {"layers.0.mixer"}
    assert cls.layer_names == {"layers.0"}
