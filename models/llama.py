"""A small Llama-like decoder whose token embedding doubles as its output projection.

Llama's recipe (Touvron et al. 2023; Llama 3 2024) differs from GPT-2 in four places, all here:
RMSNorm instead of LayerNorm, a SwiGLU MLP, rotary position embeddings (RoPE) instead of a
learned position table, and grouped-query attention (several query heads share one key/value
head). No Linear has a bias. Parameter names follow Hugging Face's Llama
(``model.embed_tokens.weight``, ``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``).

The small Llama 3.2 models (1B, 3B) tie ``lm_head`` to ``embed_tokens``: with a 128k
vocabulary the embedding is about a fifth of the 1B model, so the tie matters most there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import (
    KVCache,
    ModelOutput,
    cached_length,
    causal_attention,
    greedy_generate,
    lm_loss,
)
from .configs import LlamaConfig

__all__ = ["Llama", "LlamaConfig"]


class RMSNorm(nn.Module):
    """Scale by the root mean square only: no mean subtraction and no bias, cheaper than
    LayerNorm and as good in practice (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares is taken in float32: in half precision it loses too many bits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_len, head_dim), for rotating query/key pairs by position.

    Dimension pair i turns at frequency theta^(-2i/head_dim); the two halves of the head
    dimension form the pairs (the "rotate half" layout Hugging Face's Llama uses).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by its positions' angles. Rotating q and k makes
    their dot product depend only on the distance between the two positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        assert config.n_kv_head is not None
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)  # cached with n_kv_head heads: the memory GQA saves
        # Grouped-query attention: each group of n_head / n_kv_head query heads reads the same
        # key/value head, so repeat those heads up to the query head count for SDPA.
        repeats = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        y = causal_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), present


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP (Shazeer 2020). Three matrices instead of two,
    so d_ff is usually about 8/3 * d_model to keep the parameter count of a 4x GELU MLP."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn_out, present = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, *, generator: torch.Generator | None = None) -> None:
        """Build and initialise the model; ``generator`` as in ``GPT.__init__``."""
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.d_model),
                layers=nn.ModuleList([DecoderLayer(config) for _ in range(config.n_layer)]),
                norm=RMSNorm(config.d_model),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Derived from the config, so not saved in the state dict. A model built on the meta
        # device has meta tables; build it on a real device to run it.
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        # Hugging Face Llama initialisation: N(0, 0.02) for every matrix, RMSNorm weights at 1.
        # The head is left out: it becomes the embedding (or a copy of it) below.
        for module in self.model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)

        # Weight tying (Press & Wolf 2017, https://arxiv.org/abs/1608.05859; Vaswani et al. 2017
        # §3.4): the output projection is the input embedding, one Parameter used twice, so the
        # vocab_size * d_model matrix is stored, updated and kept in optimizer state once.
        if config.tie_weights:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            # Untied: start from a copy, so a tied/untied comparison differs only in the tie.
            self.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.detach().clone())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        """Same contract as ``GPT.forward``."""
        T = idx.size(1)
        past_len = cached_length(past_key_values, T, self.config.block_size)
        cos = self.rope_cos[past_len : past_len + T]
        sin = self.rope_sin[past_len : past_len + T]
        x = self.model.embed_tokens(idx)
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, present = layer(x, cos, sin, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        logits = self.lm_head(self.model.norm(x))
        return ModelOutput(logits, lm_loss(logits, targets), tuple(presents) if use_cache else None)

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        use_cache: bool = True,
        vocab_limit: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding: ``idx`` (batch, seq) followed by ``max_new_tokens`` argmax tokens
        (among the first ``vocab_limit`` tokens, when the vocabulary is padded past them)."""
        return greedy_generate(
            self, idx, max_new_tokens, use_cache=use_cache, vocab_limit=vocab_limit
        )
