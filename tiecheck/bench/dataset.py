"""The converge experiment's data: the corpus read, the tokenizer got (trained or cached), both
splits encoded, the validation windows cut, and each seed's batches drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiecheck.bench.converge_settings import ConvergeConfig, Plan
from tiecheck.bench.corpus import Corpus, load_corpus
from tiecheck.bench.tokenizer import TokenizerInfo, encode, get_tokenizer
from tiecheck.errors import TiecheckError


@dataclass(frozen=True)
class Data:
    corpus: Corpus
    tok: TokenizerInfo
    train_ids: torch.Tensor  # the training split's ids, one stream
    val: torch.Tensor  # (val_seqs, seq_len + 1): the held-out sequences, the same for every seed


def prepare_data(plan: Plan, cfg: ConvergeConfig) -> Data:
    """Read the corpus, get the tokenizer, encode both splits, cut the validation sequences."""
    corpus = load_corpus(cfg.text, plan.max_chars)
    tok = get_tokenizer(corpus, plan.vocab_size, cfg.tokenizer, cfg.cache)
    if cfg.tokenizer and cfg.vocab_size and tok.vocab_size != cfg.vocab_size:
        raise TiecheckError(f"--tokenizer {cfg.tokenizer}: its vocabulary has {tok.vocab_size} tokens, not the "
                            f"--vocab-size {cfg.vocab_size} asked for; drop --vocab-size or give a matching tokenizer")
    train_ids = torch.tensor(encode(tok, corpus.train), dtype=torch.long)
    val_ids = torch.tensor(encode(tok, corpus.val), dtype=torch.long)
    window = plan.seq_len + 1
    if train_ids.numel() < 4 * window:
        raise TiecheckError(f"the training text is {train_ids.numel()} tokens, too little for sequences of "
                            f"{plan.seq_len}; give more text (--text) or a smaller --seq-len")
    n_val = min(plan.val_seqs, val_ids.numel() // window)
    if n_val < 1:
        raise TiecheckError(f"the validation text is {val_ids.numel()} tokens, less than one sequence of "
                            f"{window}; give more text (--text) or a smaller --seq-len")
    val = val_ids[: n_val * window].view(n_val, window)  # consecutive, non-overlapping windows
    return Data(corpus, tok, train_ids, val)


def seed_batches(train_ids: torch.Tensor, plan: Plan, seed: int) -> torch.Tensor:
    """(steps, batch, seq_len + 1) windows at random starts: a function of ``seed`` alone."""
    g = torch.Generator().manual_seed(seed)
    window = plan.seq_len + 1
    starts = torch.randint(0, train_ids.numel() - window + 1, (plan.steps, plan.batch_size), generator=g)
    return train_ids[starts[..., None] + torch.arange(window)]
