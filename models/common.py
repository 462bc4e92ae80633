"""Pieces the reference models share: the output type, causal attention, loss, greedy decoding."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

# One (key, value) pair per layer, each shaped (batch, kv_heads, past_len, head_dim).
KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]

# Targets equal to this are left out of the loss (PyTorch's own default, so padding can use it).
IGNORE_INDEX = -100


class ModelOutput(NamedTuple):
    """What every reference model's ``forward`` returns.

    A NamedTuple, so ``out.logits`` reads clearly, ``logits, loss, _ = model(idx, targets)``
    unpacks, and tracing (fvcore) and ``torch.export`` see a plain tuple.

    - ``logits``: (batch, seq, vocab), for every position.
    - ``loss``: mean cross-entropy against ``targets``, or None when no targets were given.
    - ``past_key_values``: the KV cache to pass to the next call, or None unless
      ``use_cache=True`` (decoders only).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean token-level cross-entropy; None when there are no targets.

    float32 logits take the plain path. Half-precision logits (bf16/fp16, from autocast) are
    *not* copied to float32 first: that copy, and the float32 log-probabilities autograd keeps
    for the backward, are batch x seq x vocab x 4 bytes each -- 3.3 GB for GPT-2 at 16 x 1024
    tokens, more than the rest of the activations -- and they set the largest batch that fits.
    Instead the log-softmax runs outside autocast (which would upcast it) on the half-precision
    logits: its kernels accumulate in float32 and store half precision. The per-token losses
    are then averaged in float32, so the mean is not rounded to half precision.
    """
    if targets is None:
        return None
    flat, labels = logits.flatten(0, 1), targets.flatten()
    if flat.dtype not in (torch.float16, torch.bfloat16):
        return F.cross_entropy(flat.float(), labels, ignore_index=IGNORE_INDEX)
    with _autocast_off(flat.device):
        per_token = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = (labels != IGNORE_INDEX).sum()
    return per_token.float().sum() / counted


def _autocast_off(device: torch.device):
    """A block where autocast is off for ``device``'s type (a no-op where autocast has none)."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def cached_length(past_key_values: KVCache | None, new_len: int, block_size: int) -> int:
    """Positions already in the cache; a ValueError if the new tokens would not fit after them."""
    past_len = 0 if past_key_values is None else past_key_values[0][0].size(2)
    if past_len + new_len > block_size:
        raise ValueError(
            f"sequence of {past_len + new_len} positions is longer than block_size {block_size}"
        )
    return past_len


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention where query i may only see keys up to its own position.

    With a KV cache the keys run ahead of the queries: the queries are the *last* q_len of
    k_len positions. SDPA's ``is_causal`` aligns its mask to the top-left corner, which is only
    right when q_len == k_len, so the other cases are handled here.
    """
    q_len, k_len = q.size(-2), k.size(-2)
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if q_len == 1:
        # One new token after a cache: it may see every cached key, so no mask at all.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # Several new tokens after a cache: a causal mask aligned to the bottom-right corner.
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``idx`` (batch, seq) and return the result.

    With ``use_cache`` each step feeds only the newest token and reuses the keys and values of
    the earlier ones; without it each step re-runs the whole sequence. Both give the same tokens,
    which the tests check. The model's train/eval mode is left as the caller set it.
    ``vocab_limit``: pick only among the first ``vocab_limit`` tokens -- the real ones, when the
    vocabulary was padded for faster kernels and the rows past it are no tokens at all.
    """
    # The last generated token is never fed back, so the model sees prompt + new - 1 positions.
    limit = model.config.max_positions
    if idx.size(1) + max_new_tokens - 1 > limit:
        raise ValueError(
            f"prompt of {idx.size(1)} tokens + {max_new_tokens} new tokens does not fit "
            f"the model's {limit} positions"
        )
    past: KVCache | None = None
    step_input = idx
    for _ in range(max_new_tokens):
        if use_cache:
            out = model(step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = model(idx)
        next_token = out.logits[:, -1, :vocab_limit].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_token], dim=1)
        step_input = next_token
    return idx
