"""Analytic FLOPs of a bench step, for achieved TFLOP/s and MFU.

The formula is ``tiecheck.flops.analytic_flops``; this module reads its inputs off a
bundled model. PaLM (Chowdhery et al. 2022), appendix B: a forward pass over T tokens costs
``2·N·T + 4·L·T²·d`` FLOPs, where N counts the parameters used in matrix products (every
projection, MLP weight and the output projection -- not embedding lookups, biases or norm
gains), L the attention layers and d the query width (heads x head dimension). Attention is
counted with the full score matrix even when causal, as PaLM, nanoGPT and torchtitan do, so
MFU figures compare with theirs. A training step is forward + backward = 3 x forward.

Tied and untied variants have the same N: the output projection is the same matrix product
whether or not its weight is the embedding, and an embedding lookup is not a matmul. Their
FLOPs are equal, which the bench checks on the built models.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tiecheck.flops import analytic_flops


@dataclass(frozen=True)
class FlopsShape:
    n_matmul_params: int
    n_attention_layers: int
    d_attn: int


def forward_flops(shape: FlopsShape, seq_len: int, batch_size: int) -> int:
    return analytic_flops(shape.n_matmul_params, shape.n_attention_layers, seq_len, shape.d_attn,
                          batch_size=batch_size, attention="full")


def step_flops(shape: FlopsShape, seq_len: int, batch_size: int, mode: str) -> int:
    """FLOPs of one measured step: 3 x forward when training, the forward alone otherwise."""
    return (3 if mode == "train" else 1) * forward_flops(shape, seq_len, batch_size)


def flops_shape(model: nn.Module) -> FlopsShape | None:
    """N, L and d of a bundled model or a transformers decoder, read from its modules and config.

    N is the weights of its ``nn.Linear`` modules, each Parameter once (a tied head is still
    one product per forward). Attention layers: one per decoder block; an encoder-decoder
    adds a cross-attention per decoder layer and its encoder's self-attention (with source
    and target of equal length, as the bench feeds them). A transformers config gives L as
    ``num_hidden_layers`` and d as heads x head dimension. None for a model whose config says
    neither (a user's factory): its FLOPs, and so its MFU, are not counted.
    """
    seen: set[int] = set()
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "family") and hasattr(cfg, "d_model"):  # a bundled model
        if getattr(cfg, "kind", "decoder") == "encoder-decoder":
            layers = cfg.n_encoder_layers + 2 * cfg.n_decoder_layers
        else:
            layers = cfg.n_layer
        return FlopsShape(n_matmul_params=n, n_attention_layers=layers, d_attn=cfg.d_model)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers, heads, hidden = (getattr(text, k, None) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)):
        return None
    head_dim = getattr(text, "head_dim", None)
    return FlopsShape(n_matmul_params=n, n_attention_layers=layers,
                      d_attn=heads * (head_dim if isinstance(head_dim, int) and head_dim > 0 else hidden // heads))
