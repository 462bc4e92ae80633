"""The CPU zero-filled shortcut of ``count_flops`` gives the meta trace's figures.

A small model is traced once on the CPU with zero-filled stand-ins for its tensors ("cpu-zeros") before
the meta device is tried. The shortcut is only worth its speed if it counts what the meta trace counts:
these tests build real transformers classes from small configs on the meta device (as ``tiecheck inspect``
of a folder builds the architecture) and count each twice, with the shortcut and with it turned off.
The sweep over every registered class is ``benchmarks/sweep_flops_paths.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tiecheck.flops.trace as trace
from tiecheck.flops import standins, synthesize_inputs
from tiecheck.loaders.metainit import skip_init_on_meta

transformers = pytest.importorskip("transformers")

T = 64
# Widths, layers and vocabularies small enough that each class builds and traces in well under a second.
ATTN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**ATTN),
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=128),
    "t5": lambda: transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_decoder_layers=2, num_heads=4),
    "mixtral": lambda: transformers.MixtralConfig(**ATTN, num_local_experts=4, num_experts_per_tok=2),
    # a shared expert and its gate beside the routed ones
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**ATTN, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                                     num_experts=4, num_experts_per_tok=2),
    "mamba": lambda: transformers.MambaConfig(num_hidden_layers=2, hidden_size=32, state_size=8, vocab_size=128,
                                              intermediate_size=64, time_step_rank=4),
    "bert": lambda: transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=128),
    # windows shorter than the sequence: the attention row and the full-matrix row differ
    "mistral": lambda: transformers.MistralConfig(**ATTN, sliding_window=16),
    "gemma2": lambda: transformers.Gemma2Config(**ATTN, head_dim=8, sliding_window=16),
}
CLASSES = {
    "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration",
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mamba": "MambaForCausalLM",
    "bert": "BertForMaskedLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
}
# What a report says. by_operator is left out: on meta a convolution runs as the unfold + einsum that stand
# in for it under the tracer (the meta kernel fails there) and is listed as "einsum", on the CPU as
# "convolution", with the same multiply-adds.
FIGURES = ("forward", "by_part", "attention_calls", "attention_full_matrix", "uncounted_ops")


def _meta_model(family: str) -> torch.nn.Module:
    """The class built on meta from its small config, initialisers skipped, as inspect builds a folder's."""
    cls = getattr(transformers, CLASSES[family])
    with torch.device("meta"), skip_init_on_meta():
        return cls._from_config(CONFIGS[family]()).eval()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_shortcut_is_taken_and_counts_what_the_meta_trace_counts(family, monkeypatch):
    model = _meta_model(family)
    assert standins.small_for_zeros(model, T)
    fast = trace.count_flops(model, seq_len=T)
    assert fast.available, fast.reason
    assert fast.method == standins.ZEROS

    monkeypatch.setattr(trace, "small_for_zeros", lambda module, seq_len: False)
    meta = trace.count_flops(model, seq_len=T)
    assert meta.available, meta.reason
    assert meta.method == "meta"
    assert {k: getattr(fast, k) for k in FIGURES} == {k: getattr(meta, k) for k in FIGURES}
    assert fast.forward > 0


def test_sliding_windows_are_counted_by_the_shortcut():
    # The comparison above would pass on two traces that both ignore the window: the shortcut's windowed
    # attention row must be below its full-matrix one.
    fast = trace.count_flops(_meta_model("mistral"), seq_len=T)
    assert fast.method == standins.ZEROS
    assert fast.attention_full_matrix is not None
    assert fast.by_part["attention"] < fast.attention_full_matrix


def test_shortcut_scales_the_batch_as_the_meta_trace_counts_it(monkeypatch):
    model = _meta_model("llama")
    fast = trace.count_flops(model, seq_len=T, batch_size=3)
    assert fast.method == standins.ZEROS
    monkeypatch.setattr(trace, "small_for_zeros", lambda module, seq_len: False)
    meta = trace.count_flops(model, seq_len=T, batch_size=3)
    assert (fast.forward, fast.by_part, fast.batch_size) == (meta.forward, meta.by_part, meta.batch_size)


def test_experts_routed_on_values_are_left_to_the_real_forward():
    # Switch Transformers routes each token to its argmax expert and drops what overflows an expert's
    # capacity. Zero-filled weights tie the router's logits, every token goes to expert 0 and most are
    # dropped: the shortcut counted 8,028,160 FLOPs here where the forward does 8,282,112. Such a model is
    # not traced with zeros: the meta trace fails on its nonzero, and one example runs with its own weights.
    cfg = transformers.SwitchTransformersConfig(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_decoder_layers=2, num_heads=4, num_experts=4, expert_capacity=8,
                                                num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    assert standins.routes_on_values(model)
    assert not standins.small_for_zeros(model, T)

    counted = trace.count_flops(model, seq_len=T)
    assert counted.method == "real-batch-1"
    # The routing depends on the ids too (ids all alike route alike): torch counts the ids count_flops traced.
    assert counted.forward == torch_counts(model)


@pytest.mark.parametrize(("device", "blocks"), [(None, [3, 3, 3]), ("meta", [3, 3, 3]), ("meta", [1, 3])])
def test_funnel_counts_what_its_forward_does(device, blocks):
    # Funnel pools the sequence before the first layer of each block after the first: that layer's keys run
    # at the longer length, the block's identical later layers at the pooled one. The shortcut traces every
    # layer. The meta trace folds identical layers, and checks the fold on the first repeat it traces, which
    # here differs from its representative, so every layer is traced. [1, 3] makes the pooling block the
    # longest layer list, the one the plan folds.
    cfg = transformers.FunnelConfig(vocab_size=128, d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=blocks)
    with torch.device("meta"), skip_init_on_meta():
        counted = trace.count_flops(transformers.FunnelForMaskedLM(cfg).eval(), seq_len=T, device=device)
    assert counted.method == (standins.ZEROS if device is None else "meta")
    torch.manual_seed(0)
    assert counted.forward == torch_counts(transformers.FunnelForMaskedLM(cfg).eval())


def torch_counts(model) -> int:
    """``FlopCounterMode``'s total for one forward of ``model`` (real weights) on the ids ``count_flops`` makes."""
    inputs = synthesize_inputs(model, 1, T)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(*inputs.args, **inputs.kwargs)
    return fc.get_total_flops()


def test_a_folded_meta_trace_lists_every_layers_operators():
    # Five identical layers, traced on meta as their first two: the operators counted as neither FLOPs nor
    # matrix products (ignored_ops, uncounted_ops) are listed for all five, as the CPU trace lists them.
    cfg = transformers.LlamaConfig(**{**ATTN, "num_hidden_layers": 5})
    with torch.device("meta"), skip_init_on_meta():
        model = transformers.LlamaForCausalLM(cfg).eval()
    folded, whole = trace.count_flops(model, seq_len=T, device="meta"), trace.count_flops(model, seq_len=T)
    assert any("first 2 of 5 layers" in n for n in folded.notes)
    assert whole.method == standins.ZEROS
    assert folded.ignored_ops == whole.ignored_ops
    assert folded.uncounted_ops == whole.uncounted_ops
    assert folded.ignored_ops["aten::silu"] == 5  # one per layer's MLP
