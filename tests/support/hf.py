"""Tiny transformers models for the tests that need one (the `test` extra installs transformers).

``tiny_llama`` is the Llama the declared-layer, adapter and packed-head tests build: one layer,
a 64 x 16 embedding, tied or not. The ``quiet_transformers`` fixture (tests/conftest.py) keeps
transformers' logging and warnings out of the test output.
"""

from __future__ import annotations

import copy

import torch
import transformers

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
V, D = 64, 16


def tiny_llama(tie: bool = True, seed: int = 0, dtype: torch.dtype | None = None) -> transformers.LlamaForCausalLM:
    """A one-layer Llama with a V x D embedding, its head tied to it when ``tie``."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
                                   **({"torch_dtype": str(dtype).removeprefix("torch.")} if dtype else {}))
    model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype) if dtype else model


class ReplaceHeadAt(transformers.TrainerCallback):
    """Replaces the head by a clone at the end of optimizer step ``step``, as code that swaps a module mid-run does."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.lm_head = copy.deepcopy(model.lm_head)
