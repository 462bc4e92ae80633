"""Tie candidates: untied tensors that an architecture usually ties, and what tying saves.

Two relations matter in Transformers: the input embedding and the pre-softmax projection
(Press & Wolf 2017), and the source and target embeddings of an encoder-decoder with a shared
vocabulary (Vaswani et al. 2017, section 3.4). Roles are read from the owning module's type
when a live module is analysed, else from conventional names.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from tiecheck.analyses.duplicates import Relation
from tiecheck.facts import TensorFact, is_embedding, is_output_projection, may_have_role
from tiecheck.findings import Finding, finding


@dataclass(frozen=True)
class Candidate:
    names: tuple[str, str]
    relation: str  # "embedding-output" | "embeddings"
    shape: tuple[int, ...]
    dtype: str
    bytes_saved: int

    def to_dict(self) -> dict:
        return {"names": list(self.names), "relation": self.relation, "shape": list(self.shape),
                "dtype": self.dtype, "bytes_saved": self.bytes_saved}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Candidate:
        a, b = d["names"]
        return cls(names=(a, b), relation=d["relation"], shape=tuple(d["shape"]), dtype=d["dtype"],
                   bytes_saved=d["bytes_saved"])


def find_candidates(facts: Iterable[TensorFact]) -> list[Candidate]:
    """Untied pairs an architecture usually ties, largest saving first.

    Pairs are formed within (shape, dtype) buckets: only equal shapes and dtypes can tie, and a
    checkpoint with thousands of embedding-like names must not cost their square.
    """
    facts = facts if isinstance(facts, Sequence) else list(facts)
    if not any(map(may_have_role, facts)):
        return []  # no embedding and no head to pair (a file of expert weights): no memory walked
    # One fact per memory is enough: a name already tied to another needs no second look.
    seen, unique = set(), []
    for f in facts:
        # Buffers are computed, not trained weights: never a tie candidate (nor RoPE's frequency tables).
        if f.numel and f.role != "buffer" and f.identity not in seen:
            seen.add(f.identity)
            unique.append(f)
    embeds: dict[tuple, list[TensorFact]] = defaultdict(list)
    heads: dict[tuple, list[TensorFact]] = defaultdict(list)
    for f in unique:
        if not may_have_role(f):
            continue
        if is_embedding(f):
            embeds[(f.shape, f.dtype)].append(f)
        elif is_output_projection(f):
            heads[(f.shape, f.dtype)].append(f)
    out = []
    for key, es in embeds.items():
        for e in es:
            for h in heads.get(key, ()):
                # Sorted like every other list of names in a report: the relation says which is which.
                out.append(Candidate(tuple(sorted((e.name, h.name))), "embedding-output", e.shape, e.dtype,
                                     h.nbytes))
        for a, b in combinations(es, 2):
            out.append(Candidate(tuple(sorted((a.name, b.name))), "embeddings", a.shape, a.dtype, b.nbytes))
    return sorted(out, key=lambda c: (-c.bytes_saved, c.names))


def member_candidates(members: Iterable[Sequence[str]], by_name: Mapping[str, TensorFact]) -> list[Candidate]:
    """Candidates between the members of one duplicate group, over every name of each member.

    ``find_candidates`` looks at one name per memory, so a copy of an embedding that is still tied to
    the head under another name (FSMT's encoder embedding and output projection are one tensor, the
    decoder's embedding a clone) would be seen as two embeddings; here each member's every name counts.
    ``by_name`` maps a name to its fact.
    """
    members = [[by_name[n] for n in m if n in by_name] for m in members]
    # Every relation has an embedding on one side: a pair of members neither of which holds one is
    # never looked at, so a group of 100,000 equal tensors costs 100,000 role checks, not 5e9 pairs.
    roles = {f.name: _roles(f) for m in members for f in m}
    embedded = [i for i, m in enumerate(members) if any(roles[f.name][0] for f in m)]
    holds = set(embedded)
    out = []
    for i, a_names in enumerate(members):
        # The pairs (i, j) in the same order as before: every later member where i holds an embedding,
        # else only the later members that hold one.
        later = range(i + 1, len(members)) if i in holds else embedded[bisect_right(embedded, i):]
        for j in later:
            for a in a_names:
                for b in members[j]:
                    rel = _relation(a, b, roles[a.name], roles[b.name])
                    if rel is not None:
                        out.append(Candidate(tuple(sorted((a.name, b.name))), rel, a.shape, a.dtype, b.nbytes))
    return out


def _roles(f: TensorFact) -> tuple[bool, bool]:
    """(an input embedding, an output projection): what a fact's name and owner make it; neither for a buffer."""
    if f.role == "buffer":
        return False, False
    return is_embedding(f), is_output_projection(f)


def _relation(a: TensorFact, b: TensorFact, ra: tuple[bool, bool], rb: tuple[bool, bool]) -> str | None:
    """How two facts of ``roles`` ``ra`` and ``rb`` relate: two embeddings, an embedding and its output
    projection, or nothing."""
    if a.shape != b.shape or a.dtype != b.dtype or a.role == "buffer" or b.role == "buffer":
        return None
    (ea, ha), (eb, hb) = ra, rb
    if ea and eb:
        return "embeddings"
    if (ea and hb) or (eb and ha):
        return "embedding-output"
    return None


def role_relations(cands: list[Candidate], tie_word_embeddings: bool | None) -> list[Relation]:
    """What the candidates' roles say of a copy between them (see :class:`~tiecheck.analyses.duplicates.Relation`):
    an embedding and its output projection are one tensor unless the config says untied; two embeddings of one
    shape are usually one."""
    out = []
    for c in cands:
        a, b = c.names
        if c.relation == "embeddings":
            out.append(Relation(c.names, False, f"{a} and {b} are embeddings of one shape (a shared vocabulary is "
                                                f"usually one tensor), so this is a broken tie or a wasted copy"))
        elif tie_word_embeddings is False:
            out.append(Relation(c.names, False, f"the config keeps {a} and {b} untied (tie_word_embeddings=false), "
                                                f"so the output projection is a copy of the input embedding",
                                config_ties=False))
        elif tie_word_embeddings:
            out.append(Relation(c.names, True, f"the config (tie_word_embeddings=true) ties {a} and {b} (input "
                                               f"embedding and output projection), so this is a broken tie",
                                config_ties=True))
        else:
            out.append(Relation(c.names, True, f"{a} and {b} are an input embedding and its output projection, so "
                                               f"this is a broken tie"))
    return out


def candidate_findings(cands: list[Candidate], reported: Iterable[tuple[str, ...]] = ()) -> list[Finding]:
    """TC006 for each candidate, except a pair already reported as one duplicate group in ``reported``
    (its TC005 says it all: one finding per pair)."""
    groups = [set(g) for g in reported]
    cands = [c for c in cands if not any(set(c.names) <= g for g in groups)]
    what = {"embedding-output": "input embedding and output projection",
            "embeddings": "embeddings with a shared vocabulary"}
    return [finding("TC006", f"{c.names[0]} and {c.names[1]} ({what[c.relation]}, {list(c.shape)} {c.dtype}) are "
                             f"untied; tying them would save {c.bytes_saved:,} bytes of weights", c.names)
            for c in cands]
