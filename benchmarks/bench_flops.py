"""FLOPs of a Llama-3-8B-shaped model, counted on the meta device.

Run with ``pytest benchmarks/ --benchmark-only``. The model is Hugging Face's
``LlamaForCausalLM`` built from a config under ``torch.device("meta")``: no weights are
allocated, so the count takes seconds and well under 1 GB of memory (measured in a fresh
interpreter, the imports of torch and transformers included in both the time and the memory).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_child

from tiecheck.flops import analytic_flops, count_flops

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


def test_llama3_8b_flops_on_meta(benchmark, publish):
    model = llama3_8b_on_meta()
    result = benchmark.pedantic(count_flops, args=(model,), kwargs={"seq_len": SEQ},
                                rounds=3, iterations=1)
    assert result.available, result.reason
    assert result.method == "meta", result.reason
    kv = KV_HEADS * (D // HEADS)
    n_matmul = LAYERS * (2 * D * D + 2 * D * kv + 3 * D * FF) + D * VOCAB
    expected = analytic_flops(n_matmul, LAYERS, SEQ, D)
    assert abs(result.forward - expected) <= 0.01 * expected
    # Time and peak memory in a fresh interpreter (this process's peak includes whatever ran
    # before): the imports (this module pulls torch, transformers and tiecheck.flops), the meta
    # build and the count, all inside the timed code, as the target counts them.
    child = run_child(
        "from bench_flops import count_flops, llama3_8b_on_meta, SEQ\n"
        "_r = count_flops(llama3_8b_on_meta(), seq_len=SEQ); _out['forward'] = _r.forward",
        setup=f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})",
    )
    assert child["forward"] == result.forward
    benchmark.extra_info.update(
        forward_tflop=result.forward / 1e12,
        output_projection_share=result.output_projection_share,
        child_peak_rss_mib=round(child["peak_rss_mib"]),
        child_count_s=child["wall_s"],
    )
    # The child's wall time and peak RSS both include the imports.
    publish(f"\nLlama-3-8B shape, seq {SEQ}, meta: {result.forward / 1e12:.2f} TFLOP forward; count "
            f"{benchmark.stats.stats.median:.2f} s (median of 3, in-process); fresh process: imports + build + count "
            f"{child['wall_s']:.2f} s, peak RSS {child['peak_rss_mib']:.0f} MiB")
    assert child["peak_rss_mib"] < 1024, f"peak RSS {child['peak_rss_mib']:.0f} MiB"


def deepseek_v3_on_meta() -> torch.nn.Module:
    """DeepSeek-V3 from transformers' default config: 61 layers (3 dense), 256 routed experts top-8 + 1 shared, MLA."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config())


def test_deepseek_v3_flops_on_meta(benchmark, publish):
    model = deepseek_v3_on_meta()
    result = benchmark.pedantic(count_flops, args=(model,), kwargs={"seq_len": SEQ}, rounds=3, iterations=1)
    assert result.available, result.reason
    assert result.method == "meta", result.reason
    # identical layers are traced once and multiplied: the report says so
    assert any("identical layers traced once" in n for n in result.notes)
    child = run_child(
        "_r = count_flops(deepseek_v3_on_meta(), seq_len=SEQ); _out['forward'] = _r.forward",
        setup=f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from bench_flops import count_flops, deepseek_v3_on_meta, SEQ",
    )
    assert child["forward"] == result.forward
    p = result.parameters
    benchmark.extra_info.update(
        forward_tflop=result.forward / 1e12,
        params_total=p["total"],
        params_active=p["active_per_token"],
        child_peak_rss_mib=round(child["peak_rss_mib"]),
        child_count_s=child["wall_s"],
    )
    publish(f"\nDeepSeek-V3, seq {SEQ}, meta: {result.forward / 1e12:.2f} TFLOP forward, "
          f"{p['total'] / 1e9:.1f} B parameters, {p['active_per_token'] / 1e9:.2f} B active per token; count "
          f"{benchmark.stats.stats.median:.2f} s (median of 3); fresh process: build + count "
          f"{child['wall_s']:.2f} s (imports are setup, not timed), peak RSS {child['peak_rss_mib']:.0f} MiB")
    assert child["wall_s"] < 10, f"{child['wall_s']:.1f} s"
    assert child["peak_rss_mib"] < 1024, f"peak RSS {child['peak_rss_mib']:.0f} MiB"
