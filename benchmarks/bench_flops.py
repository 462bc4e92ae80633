"""FLOPs of a Llama-3-8B-shaped model, counted on the meta device.

Run with ``pytest benchmarks/ --benchmark-only``. The model is Hugging Face's
``LlamaForCausalLM`` built from a config under ``torch.device("meta")``: no weights are
allocated, so the count takes seconds and well under 1 GB of memory (the whole pytest
process, transformers included, is checked against that bound).
"""

from __future__ import annotations

import resource

import pytest
import torch

from tiecheck.analyses.flops import analytic_flops, count_flops

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# Llama 3 8B: 32 layers, d=4096, 32 query heads and 8 KV heads of 128, SwiGLU MLP 14336.
LAYERS, D, HEADS, KV_HEADS, FF, VOCAB, SEQ = 32, 4096, 32, 8, 14336, 128256, 2048


def llama3_8b_on_meta() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=FF, max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def test_llama3_8b_flops_on_meta(benchmark):
    model = llama3_8b_on_meta()
    result = benchmark.pedantic(count_flops, args=(model,), kwargs={"seq_len": SEQ},
                                rounds=3, iterations=1)
    assert result.available and result.method == "meta", result.reason
    kv = KV_HEADS * (D // HEADS)
    n_matmul = LAYERS * (2 * D * D + 2 * D * kv + 3 * D * FF) + D * VOCAB
    expected = analytic_flops(n_matmul, LAYERS, SEQ, D)
    assert abs(result.forward - expected) <= 0.01 * expected
    rss = peak_rss_mib()
    benchmark.extra_info.update(
        forward_tflop=result.forward / 1e12,
        output_projection_share=result.output_projection_share,
        peak_rss_mib=round(rss),
    )
    assert rss < 1024, f"peak RSS {rss:.0f} MiB"
