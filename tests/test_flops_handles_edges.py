"""The FLOPs handles at the edges of what a trace holds: a convolution whose shapes the trace left
unknown, and a product owned by the traced model itself rather than by one of its modules. Each is
traced by ``count_flops`` as a user's model would be, with torch's ``FlopCounterMode`` as the
reference for what the product costs."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tiecheck.flops import count_flops, handles

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_a_convolution_whose_shapes_the_trace_left_unknown_is_listed_as_uncounted():
    """An input in the oneDNN (mkldnn) layout runs through a plain ``Conv2d`` with its dense weight, but
    the trace records no sizes for a tensor without strides: only the weight's shape is known. The
    convolution is listed as uncounted with the reason, never counted from a guess."""
    conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(1, 3, 8, 8).to_mkldnn()
    with FlopCounterMode(display=False) as fc:
        conv(x)
    assert fc.get_total_flops() == 2 * 5 * 6 * 6 * 3 * 3 * 3  # torch itself runs and counts it
    graph, _ = torch.jit._get_trace_graph(conv, (x,))
    node = next(n for n in graph.nodes() if n.kind() == "aten::_convolution")
    assert [v.isCompleteTensor() for v in [*list(node.inputs())[:2], node.output()]] == [False, True, False]

    counted = count_flops(conv, inputs=x, device="cpu")
    assert counted.available, counted.reason
    assert counted.forward == 0
    assert counted.by_operator == {}
    assert counted.uncounted_ops == {"aten::_convolution": 1}
    assert "aten::_convolution not counted: ValueError: convolution: shapes unknown in the trace" in counted.notes


class _Wrapper(nn.Module):
    """Keeps the module it wraps under ``module``, as ``DataParallel`` and ``DistributedDataParallel`` do, and
    projects the wrapped module's output itself: that product belongs to the wrapper, the traced root."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Parameter(torch.randn(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.module(x, x, x, need_weights=False)
        return y @ self.head


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_product_of_the_traced_model_itself_is_outside_the_module_it_wraps(device):
    """The trace names the model's own scope ``module`` (the name under which the trace's root holds it),
    the same name as the wrapped attention module here: the wrapper's own product is "other", not an
    attention projection."""
    model, x = _Wrapper(), torch.randn(2, 6, 8)
    with FlopCounterMode(display=False) as fc:
        torch.matmul(torch.randn(2, 6, 8), model.head.detach())
    own = fc.get_total_flops()
    assert own == 2 * 2 * 6 * 8 * 5

    counted = count_flops(model, inputs=x, device=device)
    assert counted.available, counted.reason
    assert counted.by_operator["matmul"] == own
    assert counted.by_part["other"] == own
    # the wrapped attention's own projections (in and out, 2 x 2 x 6 x 8 x (24 + 8)) and its one call
    assert counted.by_part["attention_projections"] == counted.by_operator["linear"] == 2 * 2 * 6 * 8 * 32
    assert counted.attention_calls == {"calls": 1, "causal": 0}


_B, _TQ, _TK, _H, _D, _DV = 2, 6, 10, 3, 8, 4  # every size distinct: a size read from the wrong axis shows


class _FlashAttention(nn.Module):
    """Calls torch's flash kernel directly, in its own (batch, time, heads, head dim) layout."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.q, self.k, self.v = nn.Linear(_D, _D), nn.Linear(_D, _D), nn.Linear(_D, _DV)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._flash_attention_forward(
            self.q(x), self.k(y), self.v(y), None, None, x.shape[1], y.shape[1], 0.0, self.causal, False)
        return out[0]


@pytest.mark.parametrize(("causal", "attention", "share"), [
    (False, "full", 1), (False, "causal-half", 1), (True, "full", 1), (True, "causal-half", 2),
])
def test_the_flash_kernel_counts_as_torchs_attention_in_its_own_layout(causal, attention, share):
    """``aten::_flash_attention_forward`` takes (B, T, H, d), not SDPA's (B, H, T, d): the reference is torch's
    count of the same attention in SDPA's layout (its own formula for the raw kernel reads the axes as
    SDPA's). The kernel's ``is_causal`` says whether the mask is causal."""
    x = torch.randn(_B, _TQ, _H, _D, dtype=torch.float16)
    y = torch.randn(_B, _TK, _H, _D, dtype=torch.float16)
    counted = count_flops(_FlashAttention(causal).half(), inputs=(x, y), device="meta", attention=attention)
    assert counted.available, counted.reason
    full = sdpa_flop_count((_B, _H, _TQ, _D), (_B, _H, _TK, _D), (_B, _H, _TK, _DV))
    assert full == 2 * _B * _H * _TQ * _TK * (_D + _DV)
    assert counted.by_operator["_flash_attention_forward"] == counted.by_part["attention"] == full // share
    assert counted.attention_calls == {"calls": 1, "causal": int(causal)}


def _efficient_attention_node(custom_mask_type: int) -> torch._C.Node:
    """A graph holding ``aten::_efficient_attention_forward`` on (B, T, H, d) operands of known shapes.

    torch's tracer cannot record this kernel (its outputs include ``SymInt``s: "unsupported argument type
    c10::SymInt in the JIT tracer"), so the graph is written in TorchScript IR and read by torch's own
    parser, which checks it against the op's schema."""
    def half(*shape: int) -> str:
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        return f"Half({', '.join(map(str, shape))}, strides={strides}, requires_grad=0, device=cpu)"

    graph = torch._C.parse_ir(f"""
graph(%q : {half(_B, _TQ, _H, _D)}, %k : {half(_B, _TK, _H, _D)}, %v : {half(_B, _TK, _H, _DV)}):
  %none : NoneType = prim::Constant()
  %p : float = prim::Constant[value=0.]()
  %mask : int = prim::Constant[value={custom_mask_type}]()
  %lse : bool = prim::Constant[value=0]()
  %out : {half(_B, _TQ, _H, _DV)}, %lse_out : Tensor, %seed : Tensor, %offset : Tensor, %mq : int, %mk : int = \
aten::_efficient_attention_forward(%q, %k, %v, %none, %none, %none, %none, %none, %p, %mask, %lse, %none, %none, %none)
  return (%out)
""")
    return next(n for n in graph.nodes() if n.kind() == "aten::_efficient_attention_forward")


@pytest.mark.parametrize(("custom_mask_type", "causal"), [(0, False), (1, True), (2, True)])
def test_the_memory_efficient_kernel_reads_its_mask_type_and_its_layout(custom_mask_type, causal):
    """``custom_mask_type`` 0 is no mask, 1 causal from the top left, 2 causal from the bottom right. The
    classifier is an encoder's, with Tq != Tk, so nothing but the kernel's argument makes a call causal."""
    node = _efficient_attention_node(custom_mask_type)
    cls = handles.Classifier(nn.Module(), "module.", 1, None, "encoder", "causal-half")
    handle = handles.make_handles(cls)["aten::_efficient_attention_forward"]
    got = handle(list(node.inputs()), list(node.outputs()))
    assert cls.failures == {}
    full = sdpa_flop_count((_B, _H, _TQ, _D), (_B, _H, _TK, _D), (_B, _H, _TK, _DV))
    assert got == {"attention/_efficient_attention_forward": full // 2 if causal else full}
    assert cls.calls == {"calls": 1, "causal": int(causal)}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_a_linear_whose_input_the_trace_left_unsized_is_listed_as_uncounted():
    """``nn.Linear`` runs on an mkldnn-layout input (torch's oneDNN linear); the trace knows the weight's
    shape, not the input's."""
    linear = nn.Linear(8, 5)
    x = torch.randn(4, 8).to_mkldnn()
    assert linear(x).shape == (4, 5)
    counted = count_flops(linear, inputs=x, device="cpu")
    assert counted.available, counted.reason
    assert counted.by_operator == {}
    assert counted.uncounted_ops == {"aten::linear": 1}
    assert "aten::linear not counted: ValueError: linear: operand shapes unknown in the trace" in counted.notes


class _NestedAttention(nn.Module):
    """Attention over two sequences of different lengths, packed as one (strided) nested tensor."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        q = torch.nested.nested_tensor([a, b])
        return F.scaled_dot_product_attention(q, q, q).to_padded_tensor(0.0)


def test_attention_over_nested_tensors_the_trace_left_unsized_is_listed_as_uncounted():
    a, b = torch.randn(3, 6, 8), torch.randn(3, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nested tensors are a prototype
        assert _NestedAttention()(a, b).shape == (2, 3, 6, 8)  # torch runs it
        counted = count_flops(_NestedAttention(), inputs=(a, b), device="cpu")
    assert counted.available, counted.reason
    assert counted.by_operator == {}
    assert counted.uncounted_ops["aten::scaled_dot_product_attention"] == 1
    assert ("aten::scaled_dot_product_attention not counted: ValueError: attention: q/k/v shapes unknown in "
            "the trace") in counted.notes


@pytest.mark.parametrize("unsized", ["q", "k", "v"])
def test_attention_with_any_one_operand_unsized_is_refused(unsized):
    """One operand without sizes (a plain ``Tensor`` type, as TorchScript gives a value it cannot size) is
    enough to refuse the count: nothing is read from the operands that are sized."""
    sized = {"q": f"Float({_B}, {_H}, {_TQ}, {_D}, strides=[{_H * _TQ * _D}, {_TQ * _D}, {_D}, 1], "
                  "requires_grad=0, device=cpu)",
             "k": f"Float({_B}, {_H}, {_TK}, {_D}, strides=[{_H * _TK * _D}, {_TK * _D}, {_D}, 1], "
                  "requires_grad=0, device=cpu)",
             "v": f"Float({_B}, {_H}, {_TK}, {_DV}, strides=[{_H * _TK * _DV}, {_TK * _DV}, {_DV}, 1], "
                  "requires_grad=0, device=cpu)"}
    sized[unsized] = "Tensor"
    graph = torch._C.parse_ir(f"""
graph(%q : {sized["q"]}, %k : {sized["k"]}, %v : {sized["v"]}):
  %none : NoneType = prim::Constant()
  %p : float = prim::Constant[value=0.]()
  %causal : bool = prim::Constant[value=0]()
  %gqa : bool = prim::Constant[value=0]()
  %out : Tensor = aten::scaled_dot_product_attention(%q, %k, %v, %none, %p, %causal, %none, %gqa)
  return (%out)
""")
    node = next(n for n in graph.nodes() if n.kind() == "aten::scaled_dot_product_attention")
    cls = handles.Classifier(nn.Module(), "module.", 1, None, "encoder", "full")
    handle = handles.make_handles(cls)["aten::scaled_dot_product_attention"]
    assert handle(list(node.inputs()), list(node.outputs())) == {}
    assert cls.failed == {"aten::scaled_dot_product_attention": 1}
    assert cls.failures == {"aten::scaled_dot_product_attention": "ValueError: attention: q/k/v shapes unknown in "
                                                                  "the trace"}
    assert cls.calls == {}


@pytest.mark.parametrize(("a", "b"), [(2, 1), (2, 4), (3, 1), (1, 3), (4, 3), (1, 2)])
def test_grouped_mm_refuses_every_pair_of_ranks_it_has_no_formula_for(a, b):
    """torch's grouped_mm takes 2-D and 3-D operands only (its four cases); any other pair is refused by name,
    never read as one of the four."""
    with pytest.raises(ValueError, match=f"grouped_mm: unexpected operand ranks {a}, {b}"):
        handles._grouped_mm_macs([[4] * a, [4] * b], [])


class _SelfAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = _SelfAttention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(h)
        return h + self.mlp(h)


class _TiedLM(nn.Module):
    """A decoder whose head is its embedding's weight, applied in its own forward: no head module owns the
    logits' product, the model itself does."""

    def __init__(self, vocab: int = 101, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Block(d) for _ in range(n)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return F.linear(h, self.embed.weight)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_the_logits_of_a_head_tied_in_the_models_own_forward_are_its_output_projection(device):
    """On meta the three identical layers are traced once (the layer plan asks every product which layer owns
    it): the product of the model itself is in none, and counts once, as the output projection."""
    model, ids = _TiedLM(), torch.randint(0, 101, (1, 12))
    with FlopCounterMode(display=False) as fc:
        model(ids)
    counted = count_flops(model, inputs=ids, device=device)
    assert counted.available, counted.reason
    assert counted.uncounted_ops == {}
    assert counted.forward == fc.get_total_flops()
    assert counted.by_part["output_projection"] == 2 * 12 * 16 * 101
    # QK^T and AV in each of 3 layers; a model of no known family is not taken for a causal decoder
    assert counted.attention_calls == {"calls": 6, "causal": 0}


def test_a_dense_granite_hybrid_counts_its_shared_mlp_as_the_mlp():
    """GraniteMoeHybrid with ``num_local_experts=0`` (its dense variants) keeps a ``shared_mlp`` in every layer
    and no routed experts beside it: a shared expert only where there are routed ones."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GraniteMoeHybridConfig(
        num_hidden_layers=2, hidden_size=32, shared_intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, num_local_experts=0,
        mamba_n_heads=4, mamba_d_head=16, layer_types=["attention", "attention"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    assert model.model.layers[0].block_sparse_moe is None
    ids = torch.randint(0, 101, (1, 16))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    counted = count_flops(model, seq_len=16, device="meta")
    assert counted.available, counted.reason
    assert counted.forward == fc.get_total_flops()
    assert counted.by_part["experts"] == counted.by_part["router"] == 0
    # per layer: input_linear 32 -> 2 x 48 (gate and up), output_linear 48 -> 32
    assert counted.by_part["mlp"] == 2 * 2 * 16 * (32 * 96 + 48 * 32)


class _ConstantHeadLM(nn.Module):
    """Keeps its head as a plain tensor attribute, neither parameter nor buffer: the trace captures it as a
    constant, and it is a weight all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(101, 16)
        self.head = self.embed.weight.detach().T.contiguous()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) @ self.head


def test_a_head_the_trace_captured_as_a_constant_is_the_output_projection():
    model, ids = _ConstantHeadLM(), torch.randint(0, 101, (1, 12))
    graph, _ = torch.jit._get_trace_graph(model, (ids,))
    matmul = next(n for n in graph.nodes() if n.kind() == "aten::matmul")
    assert list(matmul.inputs())[1].node().kind() == "prim::Constant"
    with FlopCounterMode(display=False) as fc:
        model(ids)
    counted = count_flops(model, inputs=ids, device="cpu")
    assert counted.available, counted.reason
    assert counted.by_part["output_projection"] == counted.forward == fc.get_total_flops() == 2 * 12 * 16 * 101


class _TransposedHeadLM(nn.Module):
    """Ties its head by multiplying with a transposed view of the embedding's weight (``weight.T``), as
    hand-written language models do: the weight is reached through the view."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(101, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) @ self.embed.weight.T


def test_a_head_reached_through_a_view_of_the_weight_is_the_output_projection():
    model, ids = _TransposedHeadLM(), torch.randint(0, 101, (1, 12))
    with FlopCounterMode(display=False) as fc:
        model(ids)
    for device in ("meta", "cpu"):
        counted = count_flops(model, inputs=ids, device=device)
        assert counted.available, counted.reason
        assert counted.by_part["output_projection"] == counted.forward == fc.get_total_flops()


class _ManyViews(nn.Module):
    """Scores of two activations, one of them reshaped back and forth more times than the walk from an
    operand to a weight follows views (64): it must not be taken for a weight."""

    def __init__(self, views: int) -> None:
        super().__init__()
        self.views = views

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        for _ in range(self.views):
            k = k.view(-1)
            k = k.view(q.shape)
        return q @ k.transpose(-1, -2)


class _Scores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _ManyViews(40)  # 80 views, then a transpose: past the walk's bound of 64

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.self_attn(q, k)


def test_an_activation_behind_more_views_than_the_walk_follows_is_no_weight():
    q, k = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    counted = count_flops(_Scores(), inputs=(q, k), device="cpu")
    assert counted.available, counted.reason
    assert counted.by_part["attention"] == counted.forward == 2 * 2 * 6 * 6 * 8
    assert counted.by_part["attention_projections"] == 0
    # an encoder-decoder's call with no causal flag and no is_causal attribute is not causal
    assert counted.family == "encoder-decoder"
    assert counted.attention_calls == {"calls": 1, "causal": 0}


class _CoreAttention(nn.Module):
    """The scores and the weighted sum alone, as Megatron-style layers keep them (``core_attention``, given
    the config but no layer index)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _WindowedSelfAttention(nn.Module):
    """Holds the layer index and the config (Qwen2's, every layer a sliding one), and hands the attention
    itself to a child module that has no layer index."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.qkv = nn.Linear(config.hidden_size, 3 * self.heads * self.head_dim)
        self.core_attention = _CoreAttention(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.core_attention(q, k, v)


class _CoreAttentionLM(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([_WindowedSelfAttention(config, 0)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layers[0](self.embed(ids))


def test_the_window_of_attention_run_by_a_child_module_is_its_layers():
    """The nearest enclosing module with a layer index and a config says the window (``layer_types`` at that
    index): the child that runs the attention has no index, and is passed over."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                      use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert config.layer_types == ["sliding_attention"]
    t, window = 12, 4
    counted = count_flops(_CoreAttentionLM(config), inputs=torch.randint(0, 64, (1, t)), device="meta")
    assert counted.available, counted.reason
    pair = 2 * 2 * (8 + 8)  # FLOPs of one (query, key) pair over both heads: QK^T and AV
    assert counted.by_part["attention"] == pair * t * window
    assert counted.attention_full_matrix == pair * t * t
    assert ("1 attention products of sliding-window or chunked layers counted over their window; "
            "attention_full_matrix is the full-matrix figure") in counted.notes


@pytest.mark.parametrize(("a", "b"), [((4, 5), (1, 5, 3)), ((1, 4, 5), (5, 3))])
def test_a_batch_of_one_on_one_side_only_is_one_product(a, b):
    """The side without batch dimensions broadcasts as size 1: (4, 5) @ (1, 5, 3) is one product, not two."""
    with FlopCounterMode(display=False) as fc:
        torch.matmul(torch.ones(a), torch.ones(b))
    assert 2 * handles._matmul_macs(list(a), list(b)) == fc.get_total_flops() == 2 * 4 * 5 * 3


class _ProjectionByHand(nn.Module):
    """An attention module that writes its query projection as ``x @ self.wq.T`` on its input."""

    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.wq.T


class _HandProjected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _ProjectionByHand()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.self_attn(x)


def test_a_projection_through_a_view_of_its_weight_is_no_attention_product():
    """The input itself is no weight, and the weight is reached through its ``.T`` view: a projection, not
    a product of two activations (which would also count as an attention call)."""
    x = torch.randn(2, 6, 8)
    counted = count_flops(_HandProjected(), inputs=x, device="cpu")
    assert counted.available, counted.reason
    assert counted.by_part["attention_projections"] == counted.forward == 2 * 2 * 6 * 8 * 8
    assert counted.attention_calls == {"calls": 0, "causal": 0}


class _Experts(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, d, d))

    def forward(self, x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x.unsqueeze(1), self.w[pick]).squeeze(1)


class _RoutedBlock(nn.Module):
    """Routed experts whose router is a parameter of the block itself, not a ``gate``/``router`` child."""

    def __init__(self, d: int = 8, n: int = 4) -> None:
        super().__init__()
        self.router_weight = nn.Parameter(torch.randn(d, n))
        self.experts = _Experts(d, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pick = (x @ self.router_weight).argmax(-1)
        return self.experts(x, pick)


def test_routed_experts_without_a_router_module_are_experts():
    x = torch.randn(6, 8)
    counted = count_flops(_RoutedBlock(), inputs=x, device="cpu")
    assert counted.available, counted.reason
    assert counted.by_part["experts"] == 2 * 6 * 8 * 8  # one expert per token: (1 x 8) @ (8 x 8)
    assert counted.by_part["router"] == 0
    assert counted.by_part["other"] == 2 * 6 * 8 * 4  # the routing logits, outside any router module


class _VectorWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


def test_a_linear_with_a_vector_weight_is_one_dot_product_per_row():
    """``F.linear`` takes a 1-D weight (the output loses its last dimension): 4 rows of 8 multiply-adds. torch's
    FlopCounterMode has no formula for it (it counts 0), so the reference is the closed form."""
    x = torch.randn(4, 8)
    assert _VectorWeight()(x).shape == (4,)
    counted = count_flops(_VectorWeight(), inputs=x, device="cpu")
    assert counted.by_operator == {"linear": 2 * 4 * 8}


def test_an_einsum_over_a_dimension_of_size_one_is_torchs():
    shapes = [(1, 4, 5), (1, 5, 3)]
    with FlopCounterMode(display=False) as fc:
        torch.einsum("bij,bjk->bik", *(torch.ones(s) for s in shapes))
    assert 2 * handles._einsum_macs("bij,bjk->bik", shapes) == fc.get_total_flops() == 2 * 4 * 5 * 3
