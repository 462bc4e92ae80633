"""A tiny bench setup shared by the bench tests: a one-layer gpt-mini, and a builder whose model
cannot allocate activations above a few sequences, so the max-batch search runs on the CPU."""

from __future__ import annotations

import types

import torch

from tiecheck.bench.runner import bundled_builder

TINY = {"n_layer": 1, "vocab_size": 512, "d_model": 32, "n_head": 2, "block_size": 32}
TINY_ARGS = dict(model="gpt-mini", device="cpu", batch_size=2, seq_len=16, rounds=6, steps=1, warmup=2,
                 overrides=TINY)


def limited_builder(on_build=None):
    """Builds the tiny gpt-mini; its forward fails to allocate above 3 sequences (tied) or 2 (untied),
    the way a GPU runs out of memory. ``on_build(tied)`` is called before each build."""
    build = bundled_builder("gpt-mini", TINY)

    def builder(tied, dev, seed):
        if on_build:
            on_build(tied)
        m = build(tied, dev, seed)
        forward = m.forward

        def limited(self, idx, *args, **kwargs):
            if idx.shape[0] > (3 if tied else 2):
                torch.empty(2**45)  # the CPU allocator refuses 128 TiB
            return forward(idx, *args, **kwargs)

        m.forward = types.MethodType(limited, m)
        return m

    return builder
