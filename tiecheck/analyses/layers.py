"""Declared, physical, stored: every declared tie held against memory and against the files.

* **declared**: what a format or framework says (``loaders/declared.py`` reads it);
* **physical**: whether the names share memory in the model as loaded (tie groups);
* **stored**: what the files hold for them: one copy, two equal copies, two different copies.

Each declared pair becomes one row with the three layers side by side, and every disagreement
a finding whose severity follows what a loader does with it: declared tied but stored different
is wrong output somewhere (error), declared tied and stored twice equal is wasted disk
(warning), declared untied with one copy stored is a random tensor on load (error). Content is
read through a ``ContentReader``, only for the declared pairs, so this module stays torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiecheck.analyses.duplicates import Relation
from tiecheck.facts import TensorFact
from tiecheck.findings import Finding, finding

# Stored-layer states.
ONE_COPY = "one copy"
SHARED = "one copy (shared storage)"
TWO_EQUAL = "two equal copies"
TWO_DIFFERENT = "two different copies"
TWO_INCOMPARABLE = "two copies of different shape or dtype"
NOT_STORED = "not stored"
NO_FILES = "no files (in memory)"
# Physical-layer states.
TIED = "tied"
SEPARATE_EQUAL = "separate, equal"
SEPARATE_DIFFERENT = "separate, different"
SEPARATE = "separate"
ABSENT = "absent"

LOADERS_TIED = ("transformers 5 warns and loads them untied (each keeps its own stored copy); transformers 4 "
                "re-ties them on load, so the stored {target} is replaced by {source}; engines that trust the "
                "declaration (vLLM, llama.cpp converters) serve {source} as {target}")


@dataclass(frozen=True)
class LayerRow:
    names: tuple[str, str]  # (target, source): target is the name a loader fills from source
    declared: bool  # as the first declaration (the one the framework follows) says
    by: tuple[str, ...]
    physical: str
    stored: str
    nbytes: int
    conflict: bool = False  # the declarations disagree among themselves

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "declared": self.declared, "conflict": self.conflict, "by": list(self.by),
                "physical": self.physical, "stored": self.stored, "bytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerRow:
        target, source = d["names"]
        return cls(names=(target, source), declared=bool(d["declared"]), by=tuple(d["by"]), physical=d["physical"],
                   stored=d["stored"], nbytes=d["bytes"], conflict=bool(d.get("conflict")))


@dataclass(frozen=True)
class Declaration:
    """One declaration as a loader read it (``loaders/declared.py``): what it is, its value, where it came from.

    ``file`` and ``key`` say where (``config.json``, ``text_config.tie_word_embeddings``); ``more``
    holds what a kind of declaration adds (an alias map's ``broken`` entries, the config class that
    ``resolved_by`` a value), in the order the loader wrote it.
    """

    kind: str
    value: Any
    file: str | None = None
    key: str | None = None
    more: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        origin = {k: v for k, v in (("file", self.file), ("key", self.key)) if v is not None}
        return {"kind": self.kind, "value": self.value, "origin": origin, **self.more}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Declaration:
        origin = d.get("origin") or {}
        return cls(kind=d["kind"], value=d.get("value"), file=origin.get("file"), key=origin.get("key"),
                   more={k: v for k, v in d.items() if k not in ("kind", "value", "origin")})


def _equal(reader, a: TensorFact, b: TensorFact) -> bool | None:
    if reader is None or a.shape != b.shape or a.dtype != b.dtype or a.storage is None or b.storage is None:
        return None
    # Samples first, as the duplicate pass does: an embedding and a head that differ (the untied
    # case) differ there, and a full comparison would read both (2 GB for an 8B model's pair).
    if reader.sample(a.name) != reader.sample(b.name):
        return False
    return reader.equal(a.name, b.name)


def compare_layers(pairs: Sequence[Mapping[str, Any]], facts: Sequence[TensorFact],
                   stored_copies: Mapping[str, Any] | None, reader=None) -> tuple[list[LayerRow], list[Finding]]:
    """One row per declared pair, and the findings where the layers disagree.

    ``stored_copies`` maps a name to the identity of its stored bytes (None: not in the files);
    a None mapping means there are no files (a live module). ``reader`` compares contents.
    """
    by_name = {f.name: f for f in facts}
    rows: list[LayerRow] = []
    findings: list[Finding] = []
    for p in pairs:
        target, source = p["names"]
        ft, fs = by_name.get(target), by_name.get(source)
        conflict = bool(p.get("conflict"))
        declared = bool(p["declared"])
        by = tuple(p["by"])
        nbytes = (fs or ft).nbytes if (fs or ft) else 0

        equal: bool | None = None
        if ft is None or fs is None:
            physical = ABSENT
        elif ft.identity == fs.identity:
            physical, equal = TIED, True
        else:
            equal = _equal(reader, ft, fs)
            physical = SEPARATE if equal is None else SEPARATE_EQUAL if equal else SEPARATE_DIFFERENT

        if stored_copies is None:
            stored = NO_FILES
        else:
            ct, cs = stored_copies.get(target), stored_copies.get(source)
            if ct is None and cs is None:
                stored = NOT_STORED
            elif ct is None or cs is None:
                stored = ONE_COPY
            elif ct == cs:
                stored = SHARED
            elif ft is not None and fs is not None and (ft.shape != fs.shape or ft.dtype != fs.dtype):
                stored = TWO_INCOMPARABLE
            else:
                # A loader re-ties equal copies, so names tied in memory but stored apart were equal.
                stored = TWO_EQUAL if equal else TWO_DIFFERENT if equal is False else "two copies"
        rows.append(LayerRow(names=(target, source), declared=declared, by=by, physical=physical, stored=stored,
                             nbytes=nbytes, conflict=conflict))
        findings += _row_findings(rows[-1], p, stored_copies)
    return rows, findings


def _decl_text(by: Sequence[str], tied: bool) -> str:
    return f"{' and '.join(by)} declare{'s' if len(by) == 1 else ''} them {'tied' if tied else 'untied'}"


def overridden(p: Mapping[str, Any]) -> bool:
    """The pair is declared tied only by a class that overrides the flag its config file writes: every value
    written says untied (T5Config resolves ``tie_word_embeddings`` to true whatever config.json says)."""
    written = p.get("written") or []
    return bool(p["declared"]) and bool(written) and not any(written)


def _row_findings(r: LayerRow, p: Mapping[str, Any], stored_copies) -> list[Finding]:
    target, source = r.names
    names = [target, source]
    out = []
    if overridden(p) and r.stored == TWO_DIFFERENT:
        # What the loaders do, not what the class's flag says (checked with transformers 5.25 and 4.57): both
        # keep the stored copies apart, so the model loads as stored, untied by design.
        tied_by = [b for b, v in p.get("claims", {}).items() if v] or list(r.by)
        return [finding("TC015", f"{_decl_text(tied_by, True)}, but config.json writes tie_word_embeddings=false and "
                                 f"the files store {target} and {source} with different content: transformers 5 keeps "
                                 f"both stored copies (it warns), transformers 4 follows the written false; either way "
                                 f"the model loads untied, as stored", names, severity="info",
                        hint="Nothing to do: the head is trained apart from the embedding and every loader keeps it.")]
    if r.conflict:
        claims = p.get("claims", {})
        said = "; ".join(f"{b}: {'tied' if v else 'untied'}" for b, v in claims.items())
        out.append(finding("TC019", f"declarations about {target} and {source} disagree ({said}); transformers "
                                    f"follows {r.by[0]}, engines that read another key build another model", names))
    if r.declared:
        if r.stored == TWO_DIFFERENT or (r.stored == NO_FILES and r.physical == SEPARATE_DIFFERENT):
            where = "the files store" if r.stored == TWO_DIFFERENT else "memory holds"
            out.append(finding("TC015", f"{_decl_text(r.by, True)}, but {where} {target} and {source} with different "
                                        f"content: " + LOADERS_TIED.format(target=target, source=source), names))
        elif r.stored == TWO_EQUAL:
            out.append(finding("TC016", f"{_decl_text(r.by, True)}, and the files store both {target} and {source} "
                                        f"with equal content ({r.nbytes:,} bytes stored twice; transformers re-ties "
                                        f"them on load)", names, bytes_wasted=r.nbytes))
        elif r.stored == NO_FILES and r.physical == SEPARATE_EQUAL:
            out.append(finding("TC016", f"{_decl_text(r.by, True)}, but memory holds {target} and {source} as two "
                                        f"equal copies ({r.nbytes:,} bytes twice): re-tie with "
                                        f"`model.tie_weights()`", names, bytes_wasted=r.nbytes))
    else:
        missing = [n for n in names if stored_copies is not None and stored_copies.get(n) is None]
        if r.stored == ONE_COPY and len(missing) == 1:
            (gone,) = missing
            other = source if gone == target else target
            out.append(finding("TC017", f"{_decl_text(r.by, False)}, but the files hold only {other}: transformers "
                                        f"and engines that trust the declaration initialise {gone} randomly on load "
                                        f"(the model produces gibberish); if {gone} is meant to be {other}, declare "
                                        f"them tied", names))
        elif r.physical == TIED and r.stored in (NO_FILES, SHARED):
            out.append(finding("TC018", f"{_decl_text(r.by, False)}, but {target} and {source} share memory: a "
                                        f"loader that trusts the declaration builds two tensors", names))
    return out


# The Hugging Face loader's own checks (TC010 stored twice and different, TC011 config against
# architecture or files) and the tie candidate (TC006) describe a pair that the declared layer
# reports with its consequence (TC015-TC017) once declarations are read: one finding per pair,
# the declared layer's.
SUPERSEDED_BY_LAYERS = frozenset({"TC006", "TC010", "TC011"})


def superseded_dropped(findings: list[Finding], layer_findings: list[Finding]) -> list[Finding]:
    """``findings`` without the loader checks whose names a declared-layer finding covers."""
    covered = [set(f.names) for f in layer_findings if f.code in ("TC015", "TC016", "TC017")]
    return [f for f in findings
            if not (f.code in SUPERSEDED_BY_LAYERS and any(set(f.names) <= c for c in covered))]


def declared_relations(pairs: Sequence[dict]) -> list[Relation]:
    """The pairs a declaration ties (a class's ``_tied_weights_keys``, an alias map, a config flag): a copy
    between them is a broken tie."""
    out = []
    for p in pairs:
        if p["declared"] and len(p["names"]) == 2:
            a, b = sorted(p["names"])
            by = " and ".join(p["by"])
            out.append(Relation((a, b), True, f"{by} tie{'s' if len(p['by']) == 1 else ''} {a} and {b}, so this is "
                                              f"a broken tie"))
    return out
