"""The text a convergence run trains and validates on, read in a fixed order and split by file.

By default the corpus is the Python standard library's own sources (docstrings and comments
included): every Python installation has it, so the experiment needs no network and no data
set. ``--text FILE|DIR`` replaces it with the user's text. Files are read in sorted order of
their relative paths, and the split is by file -- every tenth file is held out for validation --
so no file's text is seen in training and scored in validation (a split by position inside one
stream would let a file straddle both). A corpus of a single file can only be split by
position: its last tenth of lines is the validation part.
"""

from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tiecheck.errors import TiecheckError

VAL_EVERY = 10  # file i is held out when i % VAL_EVERY == VAL_EVERY - 1
# Folders of the standard library that are not its own text: installed packages, bytecode, and
# the test suites (kept out so a corpus is the same whether a distribution ships them or not).
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class Doc:
    """One file's text (or, for a single-file corpus, a part of it)."""

    name: str  # relative path; a part of one file says which lines
    text: str


@dataclass(frozen=True)
class Corpus:
    """Train and validation documents, and a fingerprint of both (for the tokenizer cache)."""

    description: str
    train: tuple[Doc, ...]
    val: tuple[Doc, ...]

    @property
    def fingerprint(self) -> str:
        """sha256 over every document's split, name and text: equal corpora, equal digests."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("val", self.val)):
            for d in docs:
                for part in (split, d.name, d.text):
                    b = part.encode("utf-8", "surrogatepass")
                    h.update(len(b).to_bytes(8, "little") + b)
        return h.hexdigest()

    def chars(self, split: str) -> int:
        return sum(len(d.text) for d in getattr(self, split))


def split_by_file(docs: list[Doc]) -> tuple[tuple[Doc, ...], tuple[Doc, ...]]:
    """Every tenth document to validation; with 2-9 documents, the last one.

    Args:
        docs: documents in their fixed order.

    Returns:
        (train, val); no document is in both.
    """
    if len(docs) < 2:
        raise ValueError("a split by file needs at least two documents")
    val_idx = {i for i in range(len(docs)) if i % VAL_EVERY == VAL_EVERY - 1} or {len(docs) - 1}
    return (tuple(d for i, d in enumerate(docs) if i not in val_idx),
            tuple(d for i, d in enumerate(docs) if i in val_idx))


def split_by_lines(doc: Doc) -> tuple[tuple[Doc, ...], tuple[Doc, ...]]:
    """A single document: the first nine tenths of its lines train, the rest validate."""
    lines = doc.text.splitlines(keepends=True)
    if len(lines) < 2:
        raise TiecheckError(f"--text {doc.name}: one line of text cannot be split into training and validation; "
                            "give a longer file or a folder of files")
    cut = min(len(lines) - 1, max(1, math.ceil(len(lines) * (1 - 1 / VAL_EVERY))))
    return ((Doc(f"{doc.name} (lines 1-{cut})", "".join(lines[:cut])),),
            (Doc(f"{doc.name} (lines {cut + 1}-{len(lines)})", "".join(lines[cut:])),))


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (binary files are skipped)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TiecheckError(f"--text {path}: cannot read it ({e.strerror or e})") from e
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _thin(paths: list[Path], sizes: list[int], max_chars: int | None) -> list[int]:
    """Indices of an evenly spaced subset whose size is about ``max_chars`` (every k-th file)."""
    total = sum(sizes)
    if max_chars is None or total <= max_chars:
        return list(range(len(paths)))
    k = math.ceil(total / max_chars)
    return list(range(0, len(paths), k))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(max_chars: int | None = None) -> Corpus:
    """The standard library's ``.py`` sources, every k-th file in path order to stay near ``max_chars``.

    Args:
        max_chars: a budget of characters (by file size); None reads every file.

    Returns:
        The corpus, split by file.
    """
    root = stdlib_root()
    paths = sorted((p for p in root.rglob("*.py") if not (_STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))),
                   key=lambda p: p.relative_to(root).as_posix())
    sizes = [p.stat().st_size for p in paths]
    docs = []
    for i in _thin(paths, sizes, max_chars):
        text = _read_text(paths[i])
        if text and text.strip():
            docs.append(Doc(paths[i].relative_to(root).as_posix(), text))
    if len(docs) < 2:
        raise TiecheckError(f"the standard library at {root} has no Python sources to train on; "
                            "give your own with --text FILE or --text DIR")
    train, val = split_by_file(docs)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    thinned = "" if len(docs) == len(paths) else f" of {len(paths)}, evenly spaced in path order"
    return Corpus(f"Python {version} standard library sources ({len(docs)} files{thinned})", train, val)


def _files_under(folder: Path) -> Iterable[Path]:
    for p in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel):  # .git, editor files: not the user's text
            continue
        if p.is_file():
            yield p


def text_corpus(path: str | Path) -> Corpus:
    """The user's ``--text``: a file (split by lines) or a folder (its text files, split by file).

    Args:
        path: a UTF-8 text file, or a folder searched recursively (hidden entries and binary
            files skipped).

    Returns:
        The corpus.
    """
    p = Path(path)
    if not p.exists():
        raise TiecheckError(f"--text {path}: no such file or folder")
    if p.is_file():
        text = _read_text(p)
        if not text or not text.strip():
            raise TiecheckError(f"--text {path}: the file holds no text (empty, or not UTF-8); give a text file")
        train, val = split_by_lines(Doc(p.name, text))
        return Corpus(f"{p} (one file, split by lines)", train, val)
    docs, skipped = [], 0
    for f in _files_under(p):
        text = _read_text(f)
        if text and text.strip():
            docs.append(Doc(f.relative_to(p).as_posix(), text))
        else:
            skipped += 1
    if not docs:
        raise TiecheckError(f"--text {path}: no text found ({skipped} files, all empty or not UTF-8 text); "
                            "give a folder of text files")
    if len(docs) == 1:
        train, val = split_by_lines(docs[0])
        return Corpus(f"{p} (one text file, split by lines)", train, val)
    train, val = split_by_file(docs)
    return Corpus(f"{p} ({len(docs)} text files)", train, val)


def load_corpus(text: str | None, max_chars: int | None) -> Corpus:
    """``--text`` when given (read whole), else the standard library within ``max_chars``."""
    return text_corpus(text) if text else stdlib_corpus(max_chars)
