"""Small real models for the tie tests: an embedding with a tied output head, and what
breaks that tie (``load_state_dict(assign=True)``, a new Parameter over the same data)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, DIM = 64, 16
EMB, HEAD = "tok_emb.weight", "head.weight"


class TinyLM(nn.Module):
    def __init__(self, tie: bool = True, layers: int = 2):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, DIM)
        # Fresh LayerNorms are all ones: equal content by construction, not a broken tie.
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight

    def forward(self, x):
        h = self.tok_emb(x)
        for norm in self.norms:
            h = norm(h)
        return self.head(h)


def tied() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def untied() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(tie=False)


def broken() -> TinyLM:
    """Tied, then reloaded with assign=True: each name gets its own copy, the tie is gone."""
    model = tied()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model


def distinct() -> TinyLM:
    """One memory under two Parameter objects: looks tied, but gradients are not shared."""
    model = tied()
    model.head.weight = nn.Parameter(model.tok_emb.weight.data)
    return model


def on_meta() -> TinyLM:
    with torch.device("meta"):
        return TinyLM()
