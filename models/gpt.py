"""A GPT-2-style decoder whose token embedding doubles as its output projection.

Layout after nanoGPT's model.py and GPT-2 (Radford et al. 2019): learned position embeddings,
pre-LayerNorm blocks, GELU MLP, causal self-attention with a fused q/k/v projection, and a final
LayerNorm. Parameter names follow nanoGPT (``transformer.wte.weight``, ``lm_head.weight``, ...)
so checkpoints and reports read the same.

The tie: ``lm_head.weight`` *is* ``transformer.wte.weight`` (one Parameter) unless
``config.tie_weights`` is False, in which case the head starts as a copy of the embedding so
the tied and untied models start from identical values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import (
    KVCache,
    ModelOutput,
    cached_length,
    causal_attention,
    greedy_generate,
    lm_loss,
)
from .configs import GPTConfig

__all__ = ["GPT", "GPTConfig"]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.d_model // config.n_head
        # One Linear for q, k and v: one matmul instead of three, as in GPT-2.
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): SDPA attends over the last two dimensions.
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.d_ff is not None
        self.c_fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN block: normalising the input of each sub-layer (not its output, as the 2017
    Transformer did) keeps the residual stream an identity path, which trains deep stacks
    without warm-up tricks (GPT-2, Xiong et al. 2020)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn_out, present = self.attn(self.ln_1(x), past)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, generator: torch.Generator | None = None) -> None:
        """Build and initialise the model.

        ``generator`` (on the device the model is built on) makes the initial weights a
        function of its seed alone; without it the global RNG is used, so
        ``torch.manual_seed`` fixes them.
        """
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.block_size, config.d_model),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.d_model, bias=config.bias),
            )
        )
        # No bias: the head is then exactly the embedding matrix used as a linear map, the
        # only form in which it can be tied.
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights(generator)

        # Weight tying: the matrix that maps token ids to vectors also scores every token at the
        # output (logits = h @ wte.weight.T). Press & Wolf 2017, "Using the Output Embedding to
        # Improve Language Models", https://arxiv.org/abs/1608.05859; used by Vaswani et al.
        # 2017 §3.4 and GPT-2. It saves vocab_size * d_model parameters (38.6M of GPT-2's 124M)
        # and their gradients and optimizer state. Assigning the Parameter object makes both
        # modules hold the same tensor, so one gradient accumulates from both uses.
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            # Untied: start from a copy, so a tied/untied comparison differs only in the tie.
            self.lm_head.weight = nn.Parameter(self.transformer.wte.weight.detach().clone())

    def _init_weights(self, generator: torch.Generator | None) -> None:
        # GPT-2 initialisation: N(0, 0.02) weights, zero biases. The head is left out: it
        # becomes the embedding (or a copy of it) below, so both variants draw the same numbers.
        for module in self.transformer.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Projections that write into the residual stream are scaled by 1/sqrt(2 * n_layer)
        # (two per block), so the stream's variance does not grow with depth (GPT-2 §2.3).
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.transformer.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std, generator=generator)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        """Logits for every position of ``idx`` (batch, seq), of token ids.

        ``targets`` (batch, seq) adds the mean cross-entropy loss (entries equal to -100 are
        ignored). ``past_key_values`` holds the keys and values of earlier positions, so ``idx``
        continues that sequence; ``use_cache`` returns the extended cache.
        """
        T = idx.size(1)
        past_len = cached_length(past_key_values, T, self.config.block_size)
        pos = torch.arange(past_len, past_len + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        presents = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        logits = self.lm_head(self.transformer.ln_f(x))
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
