"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017).

Written out layer by layer rather than with ``nn.Transformer`` so each step of the paper can be
read in place: sinusoidal position encodings (§3.5), post-LN residual blocks (§3.1), multi-head
attention (§3.2.2), ReLU feed-forward layers (§3.3), and the three-way weight tie of §3.4.

The tie: with a shared source/target vocabulary (the paper's byte-pair vocabulary of about 37000
tokens for English-German), ``src_embed.weight``, ``tgt_embed.weight`` and ``lm_head.weight`` are
one Parameter, saving 2 * vocab_size * d_model parameters. Untied, all three start as copies of
one initial matrix, so the two variants start from identical values.

Not included: padding masks (every sequence in a batch is taken to be full length), label
smoothing, and beam search. Dropout defaults to 0 (the paper used 0.1) so runs are
deterministic; set ``dropout`` to train.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .common import ModelOutput, lm_loss
from .configs import TransformerConfig

__all__ = ["Transformer", "TransformerConfig"]


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """The §3.5 table, (max_len, d_model): PE[pos, 2i] = sin(pos / 10000^(2i/d_model)),
    PE[pos, 2i+1] = cos(...). Fixed, not learned, and defined for any position."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return table


class MultiHeadAttention(nn.Module):
    """§3.2.2. Self-attention when ``kv`` is the query's own sequence, encoder-decoder
    attention when it is the encoder output."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.head_dim = d // config.n_head
        # Separate projections: in cross-attention q comes from the decoder and k, v from the
        # encoder, so a fused q/k/v matrix would not fit both uses.
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.dropout = config.dropout

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, causal: bool) -> torch.Tensor:
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(kv))
        v = self._split_heads(self.v_proj(kv))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        B, _, T, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """§3.3: max(0, x W1 + b1) W2 + b2, applied at each position alike."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(config.d_model, config.d_ff)
        self.linear2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """§3.1, post-LN as in the paper: each sub-layer's output is LayerNorm(x + Sublayer(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, x, causal=False)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    """§3.1: masked self-attention (a position sees only earlier target positions), then
    attention over the encoder output, then the feed-forward layer; each post-LN."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.cross_attn = MultiHeadAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.norm3 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, x, causal=True)))
        x = self.norm2(x + self.dropout(self.cross_attn(x, memory, causal=False)))
        return self.norm3(x + self.dropout(self.ffn(x)))


class Transformer(nn.Module):
    def __init__(
        self, config: TransformerConfig, *, generator: torch.Generator | None = None
    ) -> None:
        """Build and initialise the model; ``generator`` as in ``GPT.__init__``."""
        super().__init__()
        self.config = config
        V, d = config.vocab_size, config.d_model
        self.src_embed = nn.Embedding(V, d)
        self.tgt_embed = nn.Embedding(V, d)
        self.encoder = nn.ModuleList([EncoderLayer(config) for _ in range(config.n_encoder_layers)])
        self.decoder = nn.ModuleList([DecoderLayer(config) for _ in range(config.n_decoder_layers)])
        self.lm_head = nn.Linear(d, V, bias=False)  # the paper's pre-softmax linear transformation
        self.dropout = nn.Dropout(config.dropout)
        # Derived from the config, so not saved in the state dict. A model built on the meta
        # device has a meta table; build it on a real device to run it.
        self.register_buffer("pos_enc", sinusoidal_positions(config.max_len, d), persistent=False)

        # The paper gives no initialisation; this follows its reference code (tensor2tensor):
        # Xavier-uniform matrices, zero biases, and embeddings drawn with std d_model^-0.5, so
        # that after the sqrt(d_model) scaling in _embed they have unit variance. The target
        # embedding and the head are left out: they become the source embedding (or copies).
        for module in [*self.encoder.modules(), *self.decoder.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.src_embed.weight, mean=0.0, std=d**-0.5, generator=generator)

        # Three-way weight tying, Vaswani et al. 2017 §3.4: "we share the same weight matrix
        # between the two embedding layers and the pre-softmax linear transformation", after
        # Press & Wolf 2017, https://arxiv.org/abs/1608.05859. It needs one vocabulary for both
        # languages. All three names then hold one Parameter, whose gradient sums all three uses.
        if config.tie_weights:
            self.tgt_embed.weight = self.src_embed.weight
            self.lm_head.weight = self.src_embed.weight
        else:
            # Untied: start all three from copies of one matrix, so a tied/untied comparison
            # differs only in the tie.
            initial = self.src_embed.weight.detach()
            self.tgt_embed.weight = nn.Parameter(initial.clone())
            self.lm_head.weight = nn.Parameter(initial.clone())

    def _embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        # §3.4: "we multiply those weights by sqrt(d_model)", which brings the tied matrix
        # (scaled for the output projection) to the size of the position encodings it is added to.
        T = ids.size(1)
        if self.config.max_len < T:
            raise ValueError(f"sequence of {T} tokens is longer than max_len {self.config.max_len}")
        return self.dropout(table(ids) * math.sqrt(self.config.d_model) + self.pos_enc[:T])

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """Source token ids (batch, src_len) -> encoder output (batch, src_len, d_model)."""
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x)
        return x

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Target token ids (batch, tgt_len) and encoder output -> logits (batch, tgt_len, V)."""
        x = self._embed(self.tgt_embed, tgt)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.lm_head(x)

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, targets: torch.Tensor | None = None
    ) -> ModelOutput:
        """Logits (batch, tgt_len, vocab) for the next target token at every target position.

        ``tgt`` is the decoder input (the target shifted right); ``targets`` (batch, tgt_len)
        adds the mean cross-entropy loss (entries equal to -100 are ignored).
        """
        logits = self.decode(tgt, self.encode(src))
        return ModelOutput(logits, lm_loss(logits, targets))
