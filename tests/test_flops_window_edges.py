"""The edges of sliding-window and chunked attention: a window of one position, and a query shorter
than its keys (a decode step over a cache).

The models are transformers' own (Mistral windows every layer, Llama 4 text chunks three of four),
built on meta. The expected figures follow the count's convention (docs/flops.md): a sliding
window w counts min(Tk, w) keys per query; chunks are defined for a prefill (Tq == Tk) only, so a
chunked layer's decode step keeps the full-matrix figure.
"""

import pytest
import torch
import transformers

from tiecheck.flops import handles
from tiecheck.flops.trace import count_flops

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)

HEADS, HEAD_DIM = 4, 8
PAIR_MACS = HEADS * (HEAD_DIM + HEAD_DIM)  # multiply-adds of one (query, key) pair over all heads: QK^T and AV
ATTN = "model.layers.0.self_attn"


def _tiny(config_cls, layers: int = 2, **kw):
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM, **kw)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _classifier(model) -> handles.Classifier:
    return handles.Classifier(model, "", 1, 64, "decoder", "full")


def test_a_window_of_one_position_counts_one_key_per_query():
    # sliding_window=1: each query attends to itself alone (Mistral's mask keeps the diagonal).
    model = _tiny(transformers.MistralConfig, sliding_window=1)
    t = 12
    r = count_flops(model, seq_len=t)
    assert r.available, r.reason
    assert r.by_part["attention"] == 2 * (2 * PAIR_MACS * t * 1)
    assert r.attention_full_matrix == 2 * (2 * PAIR_MACS * t * t)


def test_a_decode_step_over_a_cache_longer_than_the_window_counts_the_window():
    # One query over 40 cached keys in a layer windowed at 16: the query sees its last 16 keys.
    cls = _classifier(_tiny(transformers.MistralConfig, sliding_window=16))
    tq, tk = 1, 40
    flops = cls.attention_flops(ATTN, PAIR_MACS * tq * tk, True, tq, tk)
    assert flops == 2 * PAIR_MACS * tq * 16
    assert cls.calls["windowed"] == 1
    assert cls.calls["window_saved"] == 2 * PAIR_MACS * (tk - 16)


def test_a_decode_step_of_a_chunked_layer_keeps_the_full_matrix_figure():
    cls = _classifier(_tiny(transformers.Llama4TextConfig, layers=4, attention_chunk_size=16,
                            layer_types=["chunked_attention"] * 3 + ["full_attention"]))
    assert cls.window_of(ATTN) == ("chunked", 16)
    tq, tk = 1, 40
    assert handles.windowed_flops(PAIR_MACS, tq, tk, ("chunked", 16), half=False) is None
    flops = cls.attention_flops(ATTN, PAIR_MACS * tq * tk, True, tq, tk)
    assert flops == 2 * PAIR_MACS * tq * tk
    assert cls.calls["windowed"] == 0
    assert cls.calls["window_saved"] == 0


class _ViewedProjection(torch.nn.Module):
    def __init__(self, views: int):
        super().__init__()
        self.views = views
        self.w = torch.nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        w = self.w
        for _ in range(self.views):
            w = w.t()
        return x @ w


class _WithAttention(torch.nn.Module):
    def __init__(self, views: int):
        super().__init__()
        self.attn = _ViewedProjection(views)

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize(("views", "part"), [(63, "attention_projections"), (64, "attention")])
def test_a_weight_is_traced_back_through_63_views_at_most(views, part):
    """``is_weight`` walks back 64 nodes: inside an attention module a product with a weight behind 63 views is
    a projection, one behind 64 views is counted as attention between activations (the bound keeps a hostile
    graph from making the walk long)."""
    r = count_flops(_WithAttention(views), inputs=torch.ones(2, 4), device="cpu")
    assert r.available, r.reason
    assert {k: v for k, v in r.by_part.items() if v} == {part: 2 * 2 * 4 * 4}


class _UnbatchedSelfAttention(torch.nn.Module):
    """Single-head attention over unbatched activations, in a layer whose config windows it: ``(T, d)``
    queries, or with ``last`` the last position's ``(d,)`` query alone (attention pooling)."""

    def __init__(self, config, last: bool):
        super().__init__()
        self.config, self.layer_idx, self.is_causal, self.last = config, 0, True, last

    def forward(self, x):
        q = x[-1] if self.last else x
        return (q @ x.T) @ x


class _UnbatchedLM(torch.nn.Module):
    def __init__(self, config, last: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList([_UnbatchedSelfAttention(config, last)])

    def forward(self, x):
        return self.layers[0](x)


@pytest.mark.parametrize(("t", "d", "window"), [(12, 6, 4), (7, 3, 1)])
def test_unbatched_attention_products_take_their_query_length_from_their_shape(t, d, window):
    """A (T, d) query's length is its first axis; a (d,) query is one position. Each product between activations
    is counted over the window as a query of that length sees it."""
    config = transformers.MistralConfig(sliding_window=window)
    full = count_flops(_UnbatchedLM(config, last=False), inputs=torch.ones(t, d), device="cpu")
    assert full.available, full.reason
    assert full.by_part["attention"] == 2 * (2 * d * t * min(t, window))  # QK^T and AV, t queries each

    one = count_flops(_UnbatchedLM(config, last=True), inputs=torch.ones(t, d), device="cpu")
    assert one.available, one.reason
    # One query: QK^T is d x t multiply-adds and AV t x d, each counted whole (one position is its own window).
    assert one.by_part["attention"] == 2 * (d * t) + 2 * (t * d)
