"""Shared fixtures: small real modules with every kind of tie the analyses must tell apart."""

from __future__ import annotations

import pytest
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


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread: tiny models gain nothing from a second intra-op thread, and on
    a busy two-core machine the two wait on each other at every operator."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def untied_copy(tiny_lm):
    """A tie broken the way load_state_dict(assign=True) breaks it."""
    torch.manual_seed(1)
    model = TinyLM()
    sd = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    return model
