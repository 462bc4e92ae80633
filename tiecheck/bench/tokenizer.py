"""The tokenizer of a convergence run: a byte-level BPE trained on the corpus, or the user's own.

Training a BPE of 8192 tokens on a few megabytes takes seconds with the ``tokenizers`` library
(an optional extra: ``pip install 'tiecheck[converge]'``), and the result is cached under the
user's cache folder -- ``$XDG_CACHE_HOME/tiecheck/tokenizers`` or ``~/.cache/tiecheck/tokenizers``
-- keyed by a digest of the training text, the vocabulary size, the recipe and the library's
version, so a second run on the same corpus loads it instead of training again. ``--no-cache``
neither reads nor writes the cache. Byte-level means every string encodes, with no unknown
token: the model's vocabulary is exactly the tokenizer's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiecheck.bench.corpus import Corpus
from tiecheck.errors import TiecheckError
from tiecheck.report.safewrite import write_text

RECIPE = "byte-level-bpe-1"  # change when the training below changes, so old cache entries are not reused
MIN_VOCAB = 257  # the 256 byte tokens and at least one merge
TRAINED = 0  # trainings in this process: how the tests see that a cached tokenizer was not retrained


@dataclass(frozen=True)
class TokenizerInfo:
    """A tokenizer and where it came from."""

    tokenizer: Any  # tokenizers.Tokenizer
    vocab_size: int
    source: str  # one line for the header


def _tokenizers() -> Any:
    try:
        import tokenizers  # noqa: PLC0415 - an optional extra, needed only by --mode converge
    except ImportError:
        raise TiecheckError("--mode converge needs the tokenizers package, which is not installed; "
                            "pip install 'tiecheck[converge]' (or tokenizers) and rerun") from None
    return tokenizers


def cache_dir() -> Path:
    """Where trained tokenizers are kept: ``$XDG_CACHE_HOME/tiecheck/tokenizers``, else ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "tiecheck" / "tokenizers"


def shown(path: Path) -> str:
    """``path`` for the header, the home folder written ``~`` (a result file should not name the user)."""
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if home not in ("", "/") and text.startswith(home + os.sep) else text


def cache_key(corpus: Corpus, vocab_size: int) -> str:
    """Digest of what decides the trained tokenizer: the corpus, the size, the recipe, the library."""
    tk = _tokenizers()
    text = f"{RECIPE}\n{tk.__version__}\n{vocab_size}\n{corpus.fingerprint}\n"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def vocab_size_of(tokenizer: Any) -> int:
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def train_bpe(corpus: Corpus, vocab_size: int) -> Any:
    """A byte-level BPE of at most ``vocab_size`` tokens, trained on the corpus's training split.

    Args:
        corpus: the corpus; its validation split is never seen.
        vocab_size: the target size (a small corpus may run out of merges before it).

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    global TRAINED
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tok.train_from_iterator((d.text for d in corpus.train), trainer)
    TRAINED += 1
    return tok


def bpe_for(corpus: Corpus, vocab_size: int, use_cache: bool = True) -> TokenizerInfo:
    """The BPE for ``corpus`` and ``vocab_size``: from the cache when it is there, else trained (and cached).

    Args:
        corpus: the corpus to train on.
        vocab_size: the target vocabulary size.
        use_cache: False: neither read nor write the cache (``--no-cache``).

    Returns:
        The tokenizer and a line saying where it came from.
    """
    if vocab_size < MIN_VOCAB:
        raise TiecheckError(f"--vocab-size {vocab_size}: a byte-level BPE has 256 byte tokens; use {MIN_VOCAB} or more")
    tk = _tokenizers()
    path = cache_dir() / f"bpe-{vocab_size}-{cache_key(corpus, vocab_size)}.json"
    if use_cache and path.is_file():
        try:
            tok = tk.Tokenizer.from_file(str(path))
            return TokenizerInfo(tok, vocab_size_of(tok), f"byte-level BPE from the cache, {shown(path)}")
        except Exception:  # noqa: BLE001 - a damaged cache entry is retrained and replaced, never fatal
            pass
    tok = train_bpe(corpus, vocab_size)
    where = "not cached (--no-cache)"
    if use_cache:
        try:
            write_text(path, tok.to_str(), what="the tokenizer cache", make_parents=True)
            where = f"cached at {shown(path)}"
        except (TiecheckError, OSError) as e:
            where = f"not cached ({e})"  # a read-only home still runs the experiment
    return TokenizerInfo(tok, vocab_size_of(tok), f"byte-level BPE trained on the training split, {where}")


def load_tokenizer(path: str) -> TokenizerInfo:
    """``--tokenizer PATH``: a ``tokenizer.json``, or a Hugging Face tokenizer folder holding one.

    Args:
        path: the file or folder.

    Returns:
        The tokenizer.
    """
    tk = _tokenizers()
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise TiecheckError(f"--tokenizer {path}: the folder has no tokenizer.json; save a fast tokenizer "
                                "there (tokenizer.save_pretrained) or give the file itself")
        p = p / "tokenizer.json"
    elif not p.is_file():
        raise TiecheckError(f"--tokenizer {path}: no such file or folder")
    try:
        tok = tk.Tokenizer.from_file(str(p))
    except Exception as e:
        first = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise TiecheckError(f"--tokenizer {path}: not a tokenizers JSON file ({first})") from e
    return TokenizerInfo(tok, vocab_size_of(tok), f"{p}")


def get_tokenizer(corpus: Corpus, vocab_size: int, path: str | None, use_cache: bool) -> TokenizerInfo:
    """The user's tokenizer when ``path`` is given, else the cached or trained BPE."""
    return load_tokenizer(path) if path else bpe_for(corpus, vocab_size, use_cache)


def encode(info: TokenizerInfo, docs: tuple) -> list[int]:
    """Every document's token ids, concatenated in order.

    Args:
        info: the tokenizer.
        docs: the documents (``corpus.train`` or ``corpus.val``).

    Returns:
        One list of ids.
    """
    ids: list[int] = []
    for enc in info.tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False):
        ids.extend(enc.ids)
    return ids
