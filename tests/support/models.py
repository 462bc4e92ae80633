"""The suite's tiny models: every kind of tie the analyses must tell apart, and what breaks one.

``TinyLM`` and its neighbours are decoder-, BERT-, FSDP- and fused-QKV-shaped modules for the
analyses; ``SnapshotLM`` with ``tied``/``untied``/``broken``/``distinct``/``on_meta`` is the model of
the guard tests (the pytest plugin's tests copy this file into their temporary projects);
``TinyExportLM`` is what the export fixtures trace; ``EmbHead`` is the training callbacks' smallest
tied model.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyLM(nn.Module):
    """Decoder-style: input embedding tied to the pre-softmax projection."""

    def __init__(self, vocab: int = 64, d: int = 16, tie: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, idx):
        return self.lm_head(self.norm(self.block(self.embed(idx))))


class BertLikeMLM(nn.Module):
    """BERT's MLM head: decoder weight tied to the word embeddings and decoder bias tied to a bias."""

    def __init__(self, vocab: int = 50, d: int = 8):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.transform = nn.Linear(d, d)
        self.decoder = nn.Linear(d, vocab)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.decoder.weight = self.word_embeddings.weight
        self.decoder.bias = self.bias


class FlatBufferModel(nn.Module):
    """FSDP-style: every parameter is a disjoint view into one flat buffer. No ties."""

    def __init__(self):
        super().__init__()
        flat = torch.randn(4 * 8 + 8 + 8 * 3)
        self.a = nn.Parameter(flat[:32].view(4, 8))
        self.b = nn.Parameter(flat[32:40])
        self.c = nn.Parameter(flat[40:].view(8, 3))


class FusedQKV(nn.Module):
    """q, k and v as views of one fused weight, by rows and by columns. No ties."""

    def __init__(self, d: int = 8):
        super().__init__()
        w = torch.randn(3 * d, d)
        self.q = nn.Parameter(w[:d])
        self.k = nn.Parameter(w[d:2 * d])
        self.v = nn.Parameter(w[2 * d:])
        cols = torch.randn(d, 3 * d)
        self.qc = nn.Parameter(cols[:, :d])
        self.kc = nn.Parameter(cols[:, d:2 * d])
        self.vc = nn.Parameter(cols[:, 2 * d:])


class WrongLinear(nn.Module):
    """The common snippet: nn.Linear(vocab_size, d_model) given the embedding's weight."""

    def __init__(self, vocab: int = 100, d: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.output_proj = nn.Linear(vocab, d)
        self.output_proj.weight = self.embedding.weight


# -- the guard tests' model ------------------------------------------------------------------

VOCAB, DIM = 64, 16
EMB, HEAD = "tok_emb.weight", "head.weight"


class SnapshotLM(nn.Module):
    """An embedding, a few LayerNorms and a head named as the snapshot tests name them."""

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


def tied() -> SnapshotLM:
    torch.manual_seed(0)
    return SnapshotLM()


def untied() -> SnapshotLM:
    torch.manual_seed(0)
    return SnapshotLM(tie=False)


def broken() -> SnapshotLM:
    """Tied, then reloaded with assign=True: each name gets its own copy, the tie is gone."""
    model = tied()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model


def distinct() -> SnapshotLM:
    """One memory under two Parameter objects: looks tied, but gradients are not shared."""
    model = tied()
    model.head.weight = nn.Parameter(model.tok_emb.weight.data)
    return model


def on_meta() -> SnapshotLM:
    with torch.device("meta"):
        return SnapshotLM()


class TinyExportLM(nn.Module):
    """An 8x4 tied embedding and head that torch.export traces in milliseconds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(8, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


class EmbHead(nn.Module):
    """The smallest tied model a training callback sees: a 32 x 8 embedding and its head on one Parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))
