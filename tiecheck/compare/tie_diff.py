"""``TieDiff``: what ``tiecheck diff`` found, one typed row per tie kept, lost, added or changed.

Two targets are compared by name (``by_name.py``) or, across formats whose names differ by design,
by content (``by_content.py``); each comparison fills the rows of its own kind. ``to_dict`` writes
the diff's JSON (its own ``schema_version``, docs/cli.md): every row as the keys it always had, in
their order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tiecheck import __version__
from tiecheck.facts import Source
from tiecheck.report.text import json_text

DIFF_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """A tie's shape, dtype and kind on one side."""

    shape: tuple[int, ...]
    dtype: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}


# -- ties matched by name ------------------------------------------------------------------------

@dataclass(frozen=True)
class KeptTie:
    """A tie of A that B holds too; ``grown`` are the names B ties to it beyond A's."""

    names: tuple[str, ...]
    layout: Layout
    grown: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), **self.layout.to_dict(), **({"grown": list(self.grown)} if self.grown else {})}


@dataclass(frozen=True)
class NameInB:
    """What one name of a lost tie is in B: ``tied`` (elsewhere), ``untied duplicate``, ``untied`` or ``absent``."""

    state: str
    with_: tuple[str, ...] | None = None  # the names it is tied to, or equal to, in B
    shape: tuple[int, ...] | None = None  # its layout in B, where B holds it
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"state": self.state}
        if self.with_ is not None:
            d["with"] = list(self.with_)
        if self.shape is not None:
            d.update(shape=list(self.shape), dtype=self.dtype)
        return d


@dataclass(frozen=True)
class LostTie:
    """A tie of A that B does not hold, and what each of its names is in B."""

    names: tuple[str, ...]
    layout: Layout
    in_b: Mapping[str, NameInB]
    broken_into_duplicates: bool

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), **self.layout.to_dict(),
                "in_b": {n: s.to_dict() for n, s in self.in_b.items()},
                "broken_into_duplicates": self.broken_into_duplicates}


@dataclass(frozen=True)
class AddedTie:
    """A tie of B among names A did not tie."""

    names: tuple[str, ...]
    layout: Layout

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), **self.layout.to_dict()}


@dataclass(frozen=True)
class LayoutChange:
    """A kept tie whose shape or dtype differs (a resized vocabulary, a bf16 cast)."""

    names: tuple[str, ...]
    a: Layout
    b: Layout

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "a": self.a.to_dict(), "b": self.b.to_dict()}


@dataclass(frozen=True)
class KindChange:
    """A kept tie whose kind differs in substance (one Parameter became distinct Parameters)."""

    names: tuple[str, ...]
    a: str
    b: str

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "a": self.a, "b": self.b}


@dataclass(frozen=True)
class DeclaredState:
    """A declared tie on one side: its declared value and who declares it, its physical and stored layers."""

    declared: bool
    by: tuple[str, ...]
    physical: str
    stored: str

    def to_dict(self) -> dict[str, Any]:
        return {"declared": "tied" if self.declared else "untied", "by": list(self.by), "physical": self.physical,
                "stored": self.stored}


@dataclass(frozen=True)
class DeclaredTieChange:
    """A declared tie whose declared value changed, appeared or went away."""

    names: tuple[str, ...]
    a: DeclaredState | None
    b: DeclaredState | None

    def to_dict(self) -> dict[str, Any]:
        return {"what": "tie", "names": list(self.names), "a": None if self.a is None else self.a.to_dict(),
                "b": None if self.b is None else self.b.to_dict()}


@dataclass(frozen=True)
class DeclarationChange:
    """A declaration (a config key, an alias map) whose value changed, appeared or went away."""

    kind: str
    key: str
    a: Any
    b: Any
    where: str  # "both", "A only" or "B only"

    def to_dict(self) -> dict[str, Any]:
        return {"what": "declaration", "kind": self.kind, "key": self.key, "a": self.a, "b": self.b, "in": self.where}


# -- ties matched by content (across formats) ---------------------------------------------------

@dataclass(frozen=True)
class Hit:
    """A memory of B that holds a memory of A, and how it was matched (the bytes, a transpose, a shape)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    method: str
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "shape": list(self.shape), "dtype": self.dtype, "method": self.method}

    def placed(self) -> dict[str, Any]:
        """As a tie's ``in_b`` entry writes it."""
        return {"names": list(self.names), "method": self.method, "bytes": self.nbytes}


@dataclass(frozen=True)
class TensorMatch:
    """One memory of A (a tie's names together) and the memories of B found to hold it."""

    a: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    b: tuple[Hit, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"a": list(self.a), "shape": list(self.shape), "dtype": self.dtype, "b": [h.to_dict() for h in self.b]}


@dataclass(frozen=True)
class TieInB:
    """A tie of A found in B by content: one tensor there (kept), several (copies) or none (lost)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    kind: str
    in_b: tuple[Hit, ...]

    @property
    def kept(self) -> bool:
        return len(self.in_b) == 1

    @property
    def tied_in_b(self) -> bool:
        return self.kept and len(self.in_b[0].names) > 1

    @property
    def broken_into_duplicates(self) -> bool:
        return len(self.in_b) > 1

    @property
    def bytes_copied(self) -> int:
        """What the copies cost beyond one: every copy but the largest."""
        return sum(sorted(h.nbytes for h in self.in_b)[:-1]) if self.broken_into_duplicates else 0

    def to_dict(self) -> dict[str, Any]:
        d = {"names": list(self.names), "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind,
             "in_b": [h.placed() for h in self.in_b]}
        if self.kept:
            d["tied_in_b"] = self.tied_in_b
        else:
            d.update(broken_into_duplicates=self.broken_into_duplicates, bytes_copied=self.bytes_copied)
        return d


@dataclass(frozen=True)
class OnlyInB:
    """A memory of B that matches nothing of A."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes}


@dataclass(frozen=True)
class AddedInB:
    """A tie of B whose memory holds no tie of A (matched by content)."""

    names: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class TieDiff:
    """The ties of B against A's. ``matching`` is ``names`` (one format) or ``content`` (tensors matched by
    their values across formats whose names differ); ``matches`` and ``b_only`` are the content matching's."""

    a: Source
    b: Source
    kept: tuple[KeptTie | TieInB, ...] = ()
    lost: tuple[LostTie | TieInB, ...] = ()
    added: tuple[AddedTie | AddedInB, ...] = ()
    layout_changed: tuple[LayoutChange, ...] = ()
    kind_changed: tuple[KindChange, ...] = ()
    groups_a: int = 0
    groups_b: int = 0
    matching: str = "names"
    matches: tuple[TensorMatch, ...] = ()
    b_only: tuple[OnlyInB, ...] = ()
    # Declarations that differ between A and B (a declared tie's value, a config key's value).
    declared_changed: tuple[DeclaredTieChange | DeclarationChange, ...] = field(default=())

    @property
    def exit_code(self) -> int:
        """1 when a tie present in A is missing in B or changed kind, else 0."""
        return 1 if self.lost or self.kind_changed else 0

    @property
    def broken_into_duplicates(self) -> list[LostTie | TieInB]:
        return [g for g in self.lost if g.broken_into_duplicates]

    def to_dict(self) -> dict[str, Any]:
        d = self._base_dict()
        if self.matching == "content":
            d["matching"] = "content"
            d["summary"]["became_copies"] = len(self.broken_into_duplicates)
            d["summary"]["b_only"] = len(self.b_only)
            d["matches"] = [m.to_dict() for m in self.matches]
            d["b_only"] = [x.to_dict() for x in self.b_only]
        return d

    def _base_dict(self) -> dict[str, Any]:
        def rows(xs: tuple) -> list[dict[str, Any]]:
            return [x.to_dict() for x in xs]

        return {
            "schema_version": DIFF_SCHEMA_VERSION,
            "tiecheck_version": __version__,
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "summary": {"tie_groups_a": self.groups_a, "tie_groups_b": self.groups_b, "kept": len(self.kept),
                        "lost": len(self.lost), "added": len(self.added),
                        "layout_changed": len(self.layout_changed), "kind_changed": len(self.kind_changed),
                        "broken_into_duplicates": len(self.broken_into_duplicates),
                        "declared_changed": len(self.declared_changed), "exit_code": self.exit_code},
            "kept": rows(self.kept),
            "lost": rows(self.lost),
            "added": rows(self.added),
            "layout_changed": rows(self.layout_changed),
            "kind_changed": rows(self.kind_changed),
            "declared_changed": rows(self.declared_changed),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json_text(self.to_dict(), indent=indent)
