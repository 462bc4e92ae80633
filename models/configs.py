"""Configuration dataclasses for the reference models, and their exact parameter counts.

This module must not import torch: the registry (``tiecheck.models``) and ``tiecheck models``
use these classes to describe and count models without paying for a torch import. Each
``param_count`` mirrors the layers built in the matching model file (gpt.py, llama.py,
transformer.py) and counts a tied matrix once, exactly as ``module.parameters()`` does; the
test suite checks the two agree for every preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


def _check_positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def _check_heads(cfg: object, d_model: int, n_head: int) -> None:
    if d_model % n_head:
        raise ValueError(
            f"{type(cfg).__name__}: d_model={d_model} is not divisible by n_head={n_head}"
        )


@dataclass
class GPTConfig:
    """GPT-2-style decoder (gpt.py)."""

    family: ClassVar[str] = "gpt"
    kind: ClassVar[str] = "decoder"

    vocab_size: int
    block_size: int  # longest sequence the learned position table covers
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int | None = None  # None means 4 * d_model, the GPT-2 choice
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    tie_weights: bool = True

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        _check_positive(self, "vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff")
        _check_heads(self, self.d_model, self.n_head)

    @property
    def max_positions(self) -> int:
        return self.block_size

    def param_count(self) -> int:
        d, ff, b = self.d_model, self.d_ff, int(self.bias)
        assert ff is not None  # set in __post_init__
        layer_norm = d + b * d
        attention = (d * 3 * d + b * 3 * d) + (d * d + b * d)  # fused qkv, output projection
        mlp = (d * ff + b * ff) + (ff * d + b * d)
        block = 2 * layer_norm + attention + mlp
        embeddings = self.vocab_size * d + self.block_size * d  # wte + wpe
        lm_head = 0 if self.tie_weights else self.vocab_size * d  # no bias
        return embeddings + self.n_layer * block + layer_norm + lm_head


@dataclass
class LlamaConfig:
    """Small-Llama-like decoder (llama.py): RMSNorm, SwiGLU, RoPE, grouped-query attention."""

    family: ClassVar[str] = "llama"
    kind: ClassVar[str] = "decoder"

    vocab_size: int
    block_size: int  # longest sequence the RoPE tables are precomputed for
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    n_kv_head: int | None = None  # None means n_head (plain multi-head attention)
    rope_theta: float = 10000.0
    tie_weights: bool = True

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_positive(
            self, "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff"
        )
        _check_heads(self, self.d_model, self.n_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"LlamaConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def max_positions(self) -> int:
        return self.block_size

    def param_count(self) -> int:
        d, ff, hd = self.d_model, self.d_ff, self.head_dim
        assert self.n_kv_head is not None  # set in __post_init__
        q_and_o = 2 * d * self.n_head * hd
        k_and_v = 2 * d * self.n_kv_head * hd
        swiglu = 3 * d * ff  # gate, up, down
        layer = q_and_o + k_and_v + swiglu + 2 * d  # two RMSNorm weights
        embeddings = self.vocab_size * d
        lm_head = 0 if self.tie_weights else self.vocab_size * d
        return embeddings + self.n_layer * layer + d + lm_head  # + final RMSNorm


@dataclass
class TransformerConfig:
    """"Attention Is All You Need" encoder-decoder (transformer.py), one shared vocabulary."""

    family: ClassVar[str] = "transformer"
    kind: ClassVar[str] = "encoder-decoder"

    vocab_size: int  # shared by source and target (e.g. a joint BPE vocabulary)
    max_len: int  # longest source or target sequence the sinusoid table covers
    d_model: int
    n_head: int
    d_ff: int
    n_encoder_layers: int
    n_decoder_layers: int
    dropout: float = 0.0
    tie_weights: bool = True  # three-way: source embedding, target embedding, pre-softmax

    def __post_init__(self) -> None:
        _check_positive(
            self, "vocab_size", "max_len", "d_model", "n_head", "d_ff",
            "n_encoder_layers", "n_decoder_layers",
        )
        _check_heads(self, self.d_model, self.n_head)

    @property
    def max_positions(self) -> int:
        return self.max_len

    def param_count(self) -> int:
        d, ff = self.d_model, self.d_ff
        attention = 4 * (d * d + d)  # q, k, v, out projections, with biases
        ffn = (d * ff + ff) + (ff * d + d)
        layer_norm = 2 * d
        encoder_layer = attention + ffn + 2 * layer_norm
        decoder_layer = 2 * attention + ffn + 3 * layer_norm  # self- and cross-attention
        matrices = 1 if self.tie_weights else 3  # source, target, pre-softmax
        return (
            matrices * self.vocab_size * d
            + self.n_encoder_layers * encoder_layer
            + self.n_decoder_layers * decoder_layer
        )
