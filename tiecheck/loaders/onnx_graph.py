"""An ONNX graph read for its ties: which nodes read each initializer, and which embedding a head copies.

An exporter that loses a tie leaves the head's weight as a separate initializer (often the
embedding's transpose, constant-folded). Each initializer's readers (Gather: an embedding; MatMul or
Gemm: a projection) say what it is; copies are found by comparing the initializers in bounded blocks
(their transposes too), never by loading them whole. Read by ``loaders/formats/onnx_files.py``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tiecheck.errors import TargetError
from tiecheck.findings import finding
from tiecheck.loaders.fileview import FileSpan

BLOCK_BYTES = 16 << 20  # bounded reads when comparing two initializers
MAX_LISTED = 16  # nodes named per note and pair; the rest are counted
MAX_PAIRS = 1024  # embedding/head pairs listed in the report


# -- the graph: which nodes read each initializer ---------------------------------------------

@dataclass(frozen=True)
class Use:
    node: str  # node name (or op type and index when unnamed)
    op: str
    via: tuple[str, ...]  # Transpose/Identity nodes between the initializer and the node
    transposes: int  # Transposes on the way (a Gemm's transB counts)


def _node_name(node, i: int) -> str:
    return node.name or f"{node.op_type}#{i}"


def graph_uses(graph, inits: set[str]) -> tuple[dict[str, list[Use]], dict[str, list[Use]]]:
    """Embedding uses (Gather data input) and head uses (MatMul/Gemm B input) of each initializer."""
    producer: dict[str, tuple[Any, int]] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            producer.setdefault(out, (node, i))

    def source(value: str) -> tuple[str | None, tuple[str, ...], int]:
        via: list[str] = []
        transposes = 0
        for _ in range(8):  # a short chain of Identity/Transpose, never a cycle
            if value in inits:
                return value, tuple(via), transposes
            node, i = producer.get(value, (None, 0))
            if node is None or node.op_type not in ("Transpose", "Identity") or not node.input:
                return None, (), 0
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
                if perm != [1, 0]:
                    return None, (), 0
                transposes += 1
            via.append(f"{node.op_type} {_node_name(node, i)}")
            value = node.input[0]
        return None, (), 0

    embeddings: dict[str, list[Use]] = {}
    heads: dict[str, list[Use]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "Gather" and node.input:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            init, via, tr = source(node.input[0])
            if init is not None and axis == 0 and tr == 0:
                embeddings.setdefault(init, []).append(Use(_node_name(node, i), "Gather", via, 0))
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            init, via, tr = source(node.input[1])
            if init is None:
                continue
            if node.op_type == "Gemm":
                tr += next((a.i for a in node.attribute if a.name == "transB"), 0)
            heads.setdefault(init, []).append(Use(_node_name(node, i), node.op_type, via, tr))
    return embeddings, heads


# -- comparing two initializers in bounded blocks ---------------------------------------------

class _Reader:
    """Rows and column blocks of 2-D initializers: pread from their file when mapped, else from memory."""

    def __init__(self, tensors: dict[str, torch.Tensor], spans: dict[str, FileSpan]):
        self.tensors, self.spans = tensors, spans
        self.fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def _np(self, t: torch.Tensor, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=_element(t.element_size()))

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        t = self.tensors[name]
        cols = t.shape[1]
        span = self.spans.get(name)
        if span is None:
            return _bits(t[start:stop]).reshape(stop - start, cols)
        size = t.element_size()
        if span.path not in self.fds:
            self.fds[span.path] = os.open(span.path, os.O_RDONLY)
        fd = self.fds[span.path]
        off = span.offset + (t.storage_offset() + start * cols) * size
        want = (stop - start) * cols * size
        data = os.pread(fd, want, off)
        if len(data) != want:
            raise TargetError(f"{span.path}: short read: the file changed or is truncated")
        return self._np(t, data).reshape(stop - start, cols)

    def columns(self, name: str, start: int, stop: int) -> np.ndarray:
        """Columns [start, stop) of every row, as a (rows, stop - start) array."""
        t = self.tensors[name]
        if self.spans.get(name) is None:
            return _bits(t[:, start:stop])
        span, size, cols = self.spans[name], t.element_size(), t.shape[1]
        if span.path not in self.fds:
            self.fds[span.path] = os.open(span.path, os.O_RDONLY)
        fd, base, want = self.fds[span.path], span.offset + t.storage_offset() * size, (stop - start) * size
        parts = []
        for r in range(t.shape[0]):  # one short read per row: only the block's columns
            data = os.pread(fd, want, base + (r * cols + start) * size)
            if len(data) != want:
                raise TargetError(f"{span.path}: short read: the file changed or is truncated")
            parts.append(data)
        return self._np(t, b"".join(parts)).reshape(t.shape[0], stop - start)


def _element(size: int) -> np.dtype:
    """One array element per tensor element, compared by its bytes: an unsigned integer of its width, or
    raw bytes of that width for the 16-byte complex128 (numpy has no 16-byte integer)."""
    return np.dtype(f"u{size}") if size in (1, 2, 4, 8) else np.dtype(f"V{size}")


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().view(_element(t.element_size()))


def transposed_equal(reader: _Reader, a: str, b: str) -> bool:
    """True when initializer ``b`` holds exactly the bytes of ``a``'s transpose (both 2-D).

    Rows of ``a`` are read a block at a time and compared with the matching columns of ``b``,
    so memory stays within a few blocks whatever the tensors' size.
    """
    ta, tb = reader.tensors[a], reader.tensors[b]
    if ta.dim() != 2 or tuple(tb.shape) != tuple(ta.shape)[::-1] or ta.dtype != tb.dtype:
        return False
    rows, cols = ta.shape
    step = max(1, BLOCK_BYTES // max(1, cols * ta.element_size()))
    # A cheap first look: row 0 of a against column 0 of b rules out unrelated tensors.
    if not np.array_equal(reader.rows(a, 0, 1)[0], reader.columns(b, 0, 1)[:, 0]):
        return False
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if not np.array_equal(reader.rows(a, start, stop), reader.columns(b, start, stop).T):
            return False
    return True


def plain_equal(reader: _Reader, a: str, b: str) -> bool:
    ta, tb = reader.tensors[a], reader.tensors[b]
    if ta.dim() != 2 or ta.shape != tb.shape or ta.dtype != tb.dtype:
        return False
    rows, cols = ta.shape
    step = max(1, BLOCK_BYTES // max(1, cols * ta.element_size()))
    return all(np.array_equal(reader.rows(a, s, min(rows, s + step)), reader.rows(b, s, min(rows, s + step)))
               for s in range(0, rows, step))


def _describe(use: Use) -> str:
    via = f" through {', '.join(use.via)}" if use.via else ""
    return f"{use.op} {use.node}{via}"


def _listed(items: list[str], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` items, and how many more: a graph may have thousands of readers."""
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more:,} more" if more > 0 else "")


def _digest(reader: _Reader, name: str, transposed: bool) -> bytes:
    """SHA-256 of a 2-D initializer's bytes in row order, or of its transpose's, read in blocks."""
    t = reader.tensors[name]
    rows, cols = t.shape
    h = hashlib.sha256()
    if transposed:
        step = max(1, BLOCK_BYTES // max(1, rows * t.element_size()))
        for start in range(0, cols, step):
            h.update(np.ascontiguousarray(reader.columns(name, start, min(cols, start + step)).T).tobytes())
    else:
        step = max(1, BLOCK_BYTES // max(1, cols * t.element_size()))
        for start in range(0, rows, step):
            h.update(reader.rows(name, start, min(rows, start + step)).tobytes())
    return h.digest()


def _copies(reader: _Reader, embeddings: list[str], heads: dict[str, list[Use]]) -> dict[str, tuple[str, str]]:
    """head initializer -> (the first embedding it holds a copy of, "transposed copy" or "copy").

    Pairs are never tried all against all: each initializer's bytes (and each embedding's
    transpose) are hashed once, heads are matched to embeddings by hash and shape, and each match
    is then confirmed byte for byte, so the work is one pass over each initializer whatever the
    number of Gather and MatMul nodes.
    """
    tensors = reader.tensors
    wanted_t, wanted = {}, {}  # (dtype, shape) -> heads that could hold a transpose / a plain copy
    for head, uses in heads.items():
        h = tensors[head]
        if h.dim() == 2 and h.numel():  # an empty head holds no bytes, so none stored twice
            key = (h.dtype, tuple(h.shape))
            wanted_t.setdefault(key, []).append(head)
            if any(u.transposes % 2 for u in uses):
                wanted.setdefault(key, []).append(head)
    by_digest: dict[tuple, list[str]] = {}  # (relation, dtype, shape, digest) -> embeddings, in graph order
    for emb in embeddings:
        e = tensors[emb]
        key_t, key = (e.dtype, tuple(e.shape)[::-1]), (e.dtype, tuple(e.shape))
        if key_t in wanted_t:
            by_digest.setdefault(("transposed copy", *key_t, _digest(reader, emb, True)), []).append(emb)
        if key in wanted:
            by_digest.setdefault(("copy", *key, _digest(reader, emb, False)), []).append(emb)
    out: dict[str, tuple[str, str]] = {}
    for relation, table in (("transposed copy", wanted_t), ("copy", wanted)):
        for key, candidates in table.items():
            for head in candidates:
                if head in out:
                    continue
                same = by_digest.get((relation, *key, _digest(reader, head, False)), [])
                emb = next((x for x in same if x != head), None)  # a head reading the embedding itself is a tie
                check = transposed_equal if relation == "transposed copy" else plain_equal
                if emb is not None and check(reader, emb, head):
                    out[head] = (emb, relation)
    return out


def embedding_heads(tensors: Mapping[str, torch.Tensor], spans: dict[str, FileSpan], graph,
                    notes: list[str]) -> tuple[list[dict], list[Any], list[str]]:
    """How each embedding (Gather) initializer relates to each head (MatMul/Gemm) initializer.

    Returns the pairs (for the report, one per head use, at most ``MAX_PAIRS``), loader findings
    (one per embedding and head initializer), and the names of the aliases added to ``tensors``
    for heads that read the embedding's own initializer.
    """
    embeddings, heads = graph_uses(graph, set(tensors))
    embeddings = {e: g for e, g in embeddings.items() if tensors[e].dim() == 2}
    pairs: list[dict] = []
    found: list[Any] = []
    aliases: list[str] = []
    reader = _Reader(tensors, spans)
    try:
        copies = _copies(reader, list(embeddings), heads)
    finally:
        reader.close()

    def pair(emb: str, head: str, use: Use, relation: str, nbytes: int, alias: str | None = None) -> None:
        if len(pairs) >= MAX_PAIRS:
            return
        e = tensors[emb]
        gathers = embeddings[emb]
        pairs.append({"embedding": emb, "embedding_nodes": [g.node for g in gathers[:MAX_LISTED]],
                      "head": head, "head_node": use.node, "head_op": use.op, "via": list(use.via),
                      "shape": list(e.shape), "dtype": str(e.dtype).replace("torch.", ""), "relation": relation,
                      **({"alias": alias} if alias else {}), "bytes_copied": nbytes})

    for emb, gathers in embeddings.items():
        e = tensors[emb]
        gather_text = _listed([_describe(g) for g in gathers])
        uses = heads.get(emb, [])
        for use in uses:  # the head reads the embedding's own initializer: the tie survived
            alias = f"{use.node}:B"
            tensors.add_alias(alias, emb, transposed=sum(1 for v in use.via if v.startswith("Transpose")) % 2 == 1)
            if emb in spans:
                spans[alias] = spans[emb]
            aliases.append(alias)
            pair(emb, emb, use, "one tensor", 0, alias)
        if uses:
            notes.append(f"{emb} {list(e.shape)} is read by {gather_text} (embedding) and by "
                         f"{_listed([_describe(u) for u in uses])} (head): one initializer, the tie survived the "
                         f"export (the head's use is listed as {_listed([f'{u.node}:B' for u in uses])})")
    for head, (emb, relation) in copies.items():
        e, h = tensors[emb], tensors[head]
        uses = [u for u in heads[head] if relation == "transposed copy" or u.transposes % 2]
        nbytes = h.numel() * h.element_size()
        for use in uses:
            pair(emb, head, use, relation, nbytes)
        use_text = _listed([_describe(u) for u in uses])
        notes.append(f"{emb} {list(e.shape)} is read by {_listed([_describe(g) for g in embeddings[emb]])} "
                     f"(embedding); the head {use_text} reads {head} {list(h.shape)}, a {relation} of it: the tie "
                     f"was lost in the export ({nbytes:,} bytes stored twice)")
        if relation == "transposed copy":
            # Equal-shape copies are the content pass's (TC005); a transposed copy is
            # found here, from the graph, where the two uses are known.
            found.append(finding(
                "TC005", f"{head} {list(h.shape)} holds the transpose of {emb} {list(e.shape)} in "
                         f"separate memory: the export stored the tied embedding twice, once "
                         f"transposed for {use_text} ({nbytes:,} bytes wasted)", (emb, head),
                hint="Export with the torch.export-based exporter (torch.onnx.export(..., "
                     "dynamo=True)), which keeps one initializer, or deduplicate the model so "
                     "the head reads Transpose(embedding)."))
    if len(pairs) >= MAX_PAIRS:
        notes.append(f"the graph's embedding/head pairs are listed up to {MAX_PAIRS:,}")
    return pairs, found, aliases
