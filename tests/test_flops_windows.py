"""Sliding-window and chunked attention counted as the architecture computes it (docs/flops.md).

Tiny Mistral (every layer windowed), Gemma 2 (alternating sliding/full), Gemma 3 text and
Llama 4 text (chunked) configs on meta. The expected attention FLOPs are written from the
formula: one (query, key) pair of one head costs 2 x (head_dim + head_dim) FLOPs (QK^T and AV);
a sliding window w counts min(T, w) keys per query, a chunk of c positions a c x c block.
"""

import pytest
import torch
import transformers

from tiecheck.flops.handles import windowed_flops
from tiecheck.flops.trace import count_flops

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)

HEADS, HEAD_DIM, LAYERS, WINDOW = 4, 8, 4, 16
PAIR = 2 * HEADS * (HEAD_DIM + HEAD_DIM)  # FLOPs of one (query, key) pair over all heads


def _tiny(config_cls, **kw):
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM, **kw)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _sliding(t: int) -> int:
    return PAIR * t * min(t, WINDOW)


def _chunked(t: int) -> int:
    full, rest = divmod(t, WINDOW)
    return PAIR * (full * WINDOW * WINDOW + rest * rest)


def _full(t: int) -> int:
    return PAIR * t * t


@pytest.fixture(scope="module")
def models():
    return {
        "mistral": _tiny(transformers.MistralConfig, sliding_window=WINDOW),
        "gemma2": _tiny(transformers.Gemma2Config, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"] * 2),
        "gemma3": _tiny(transformers.Gemma3TextConfig, sliding_window=WINDOW,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"]),
        "llama4": _tiny(transformers.Llama4TextConfig, attention_chunk_size=WINDOW,
                        layer_types=["chunked_attention"] * 3 + ["full_attention"]),
    }


EXPECTED = {  # attention FLOPs at length T, per architecture
    "mistral": lambda t: 4 * _sliding(t),
    "gemma2": lambda t: 2 * _sliding(t) + 2 * _full(t),
    "gemma3": lambda t: 3 * _sliding(t) + _full(t),
    "llama4": lambda t: 3 * _chunked(t) + _full(t),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_windowed_attention_beyond_the_window(models, arch):
    r = count_flops(models[arch], seq_len=40)
    assert r.available, r.reason
    assert r.by_part["attention"] == EXPECTED[arch](40)
    assert r.attention_full_matrix == LAYERS * _full(40)
    assert r.to_dict()["attention_full_matrix"] == LAYERS * _full(40)
    assert any("sliding-window or chunked" in n for n in r.notes)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_within_the_window_equals_the_full_matrix(models, arch):
    r = count_flops(models[arch], seq_len=WINDOW)
    assert r.by_part["attention"] == LAYERS * _full(WINDOW) == EXPECTED[arch](WINDOW)
    assert r.attention_full_matrix is None
    assert r.to_dict()["attention_full_matrix"] is None


def test_causal_half_keeps_the_band_and_drops_its_triangle(models):
    t, w = 40, WINDOW
    r = count_flops(models["gemma2"], seq_len=t, attention="causal-half")
    band = PAIR * (t * w - w * w // 2)
    assert r.by_part["attention"] == 2 * band + 2 * _full(t) // 2
    assert r.attention_full_matrix == LAYERS * _full(t) // 2


def test_windowed_flops_formula():
    # per pair 1 multiply-add: a window as long as the sequence is the full matrix, either convention
    assert windowed_flops(1, 10, 10, ("sliding", 10), half=False) == 2 * 100
    assert windowed_flops(1, 10, 10, ("sliding", 10), half=True) == 100
    assert windowed_flops(1, 10, 10, ("sliding", 4), half=False) == 2 * 40
    assert windowed_flops(1, 10, 10, ("sliding", 4), half=True) == 2 * (40 - 8)
    assert windowed_flops(1, 10, 10, ("chunked", 4), half=False) == 2 * (16 + 16 + 4)
    assert windowed_flops(1, 10, 10, ("chunked", 4), half=True) == 16 + 16 + 4
    assert windowed_flops(1, 1, 10, ("chunked", 4), half=False) is None  # decode step: not a prefill
    assert windowed_flops(1, 1, 30, ("sliding", 4), half=False) == 2 * 4


def test_no_window_no_full_matrix_field():
    m = _tiny(transformers.Qwen2Config)
    r = count_flops(m, seq_len=40)
    assert r.by_part["attention"] == LAYERS * _full(40)
    assert r.attention_full_matrix is None


def test_bidirectional_attention_keeps_the_full_matrix(models):
    # a window bounds causal self-attention only: the same layers marked non-causal are counted whole
    model = models["mistral"]
    layers = model.model.layers
    try:
        for layer in layers:
            layer.self_attn.is_causal = False
        r = count_flops(model, seq_len=40)
    finally:
        for layer in layers:
            layer.self_attn.is_causal = True
    assert r.by_part["attention"] == LAYERS * _full(40)
    assert r.attention_full_matrix is None
