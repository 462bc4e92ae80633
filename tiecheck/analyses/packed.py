"""Quantized or packed heads: an embedding and a head of one logical shape stored in different formats.

Quantizing a tied model often breaks the tie: the head is quantized (int8, fp8, nf4, a GGUF
block format) while the embedding stays bf16, so the files hold the embedding twice, once in
another format. Values in different formats cannot be compared byte for byte (and dequantizing
to compare would read and convert the whole tensor for an answer that is approximate anyway), so
the pair is matched by meaning: the input embedding and the output projection, of equal logical
shape, in separate memory. The logical shape of a packed tensor (bitsandbytes 4-bit stores
``[n/2, 1]`` uint8) comes from its format's own record, read by ``loaders/packed.py``; this module
stays torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tiecheck.analyses.layers import LayerRow
from tiecheck.facts import Packing, TensorFact, is_embedding, is_output_projection, may_have_role
from tiecheck.findings import Finding, finding


@dataclass(frozen=True)
class PackedHead:
    names: tuple[str, str]  # (embedding, head)
    shape: tuple[int, ...]
    formats: tuple[str, str]
    head_bytes: int  # the head as stored, its companions included: what a tie would not store
    embedding_bytes: int
    companions: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shape": list(self.shape), "formats": list(self.formats),
                "head_bytes": self.head_bytes, "embedding_bytes": self.embedding_bytes,
                "companions": list(self.companions)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PackedHead:
        (e, h), (fe, fh) = d["names"], d["formats"]
        return cls(names=(e, h), shape=tuple(d["shape"]), formats=(fe, fh), head_bytes=d["head_bytes"],
                   embedding_bytes=d["embedding_bytes"], companions=tuple(d.get("companions", ())))


def _role(f: TensorFact, p: Packing | None) -> str | None:
    if p is not None and p.role:
        return p.role
    if not may_have_role(f):
        return None
    if is_embedding(f):
        return "embedding"
    return "head" if is_output_projection(f) else None


def find_packed_heads(facts: Iterable[TensorFact], packings: Mapping[str, Packing]) -> list[PackedHead]:
    """Embedding/head pairs of equal logical shape stored in different formats, in separate memory.

    Args:
        facts: the tensor facts.
        packings: name -> how it is stored, for tensors whose stored shape or dtype is not the
            logical one (a tensor not listed is its own dtype and shape).

    Returns:
        One entry per pair, largest head first.
    """
    facts = [f for f in facts if f.numel]
    if not any(p.role for p in packings.values()) and not any(map(may_have_role, facts)):
        return []  # nothing is an embedding or a head (``_role``): no pair to find
    companions = {c for p in packings.values() for c in p.companions}
    by_name = {f.name: f for f in facts if f.name in companions}
    seen, unique = set(), []
    for f in facts:
        # Embeddings and heads are 2-D, unless a packing says what they are.
        if (len(f.shape) == 2 or f.name in packings) and f.identity not in seen and f.name not in companions:
            seen.add(f.identity)
            unique.append(f)

    def logical(f: TensorFact) -> tuple[tuple[int, ...], str]:
        p = packings.get(f.name)
        return (tuple(p.shape), p.format) if p is not None else (tuple(f.shape), f.dtype)

    roles = {f.name: _role(f, packings.get(f.name)) for f in unique}
    embeds = [f for f in unique if roles[f.name] == "embedding"]
    heads = [f for f in unique if roles[f.name] == "head"]
    out = []
    for e in embeds:
        (eshape, efmt) = logical(e)
        for h in heads:
            (hshape, hfmt) = logical(h)
            if h.identity == e.identity or hshape != eshape or hfmt == efmt:
                continue
            comp = tuple(sorted(packings[h.name].companions)) if h.name in packings else ()
            out.append(PackedHead(names=(e.name, h.name), shape=eshape, formats=(efmt, hfmt),
                                  head_bytes=h.nbytes + sum(by_name[c].nbytes for c in comp if c in by_name),
                                  embedding_bytes=e.nbytes, companions=comp))
    return sorted(out, key=lambda p: (-p.head_bytes, p.names))


def packed_head_findings(pairs: Sequence[PackedHead], declared_ties: Sequence[LayerRow]) -> list[Finding]:
    """TC022 per pair: a warning where a declaration says the two are tied (quantization broke a
    declared tie), else info (a tied model quantized apart, or an untied one: bytes cannot tell)."""
    tied = [set(t.names) for t in declared_ties if t.declared]
    by = {frozenset(t.names): t.by for t in declared_ties if t.declared}
    out = []
    for p in pairs:
        emb, head = p.names
        what = (f"{head} ({p.formats[1]}) and {emb} ({p.formats[0]}) are the output projection and the input "
                f"embedding, both {list(p.shape)}, stored in different formats: their values are not compared")
        extra = f" (with {', '.join(p.companions)})" if p.companions else ""
        if {emb, head} in tied:
            decl = " and ".join(by[frozenset((emb, head))])
            out.append(finding("TC022", f"{decl} declare{'s' if len(by[frozenset((emb, head))]) == 1 else ''} "
                                        f"them tied, but {what}: quantization broke the tie and the files store "
                                        f"the embedding again as {head}{extra}, {p.head_bytes:,} bytes; a loader "
                                        f"that re-ties replaces the quantized head by the embedding, one that does "
                                        f"not serves a head that differs from it", p.names, severity="warning",
                               bytes=p.head_bytes))
        else:
            out.append(finding("TC022", f"{what}; if the model was tied before quantization, {head}{extra} is the "
                                        f"embedding stored again: {p.head_bytes:,} bytes", p.names,
                               bytes=p.head_bytes))
    return out
