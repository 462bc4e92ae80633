"""Two reports' ties matched by name: kept, lost (and what each name became), added, changed."""

from __future__ import annotations

from typing import Any

from tiecheck.analyses.expect import kinds_match
from tiecheck.analyses.layers import LayerRow
from tiecheck.analyses.ties import TieGroup
from tiecheck.compare.tie_diff import (
    AddedTie,
    DeclarationChange,
    DeclaredState,
    DeclaredTieChange,
    KeptTie,
    KindChange,
    Layout,
    LayoutChange,
    LostTie,
    NameInB,
    TieDiff,
)
from tiecheck.report.report import Declared, Report


def _layout(g: TieGroup) -> Layout:
    return Layout(g.shape, g.dtype, g.kind)


def compare(ra: Report, rb: Report) -> TieDiff:
    """The tie structure of B against A's, from two reports."""
    group_b = {n: i for i, g in enumerate(rb.tie_groups) for n in g.names}
    dup_b = {n: i for i, d in enumerate(rb.untied_duplicates) for n in d.names}
    tensor_b = {t.name: t for t in rb.tensors}
    kept, lost, layout_changed, kind_changed = [], [], [], []
    covered_b: set[int] = set()
    for g in ra.tie_groups:
        homes = {group_b.get(n) for n in g.names}
        if len(homes) == 1 and None not in homes:
            (i,) = homes
            gb = rb.tie_groups[i]
            covered_b.add(i)
            kept.append(KeptTie(g.names, _layout(g), grown=tuple(sorted(set(gb.names) - set(g.names)))))
            if (gb.shape, gb.dtype) != (g.shape, g.dtype):
                layout_changed.append(LayoutChange(g.names, _layout(g), _layout(gb)))
            if not kinds_match(g.kind, gb.kind):
                kind_changed.append(KindChange(g.names, g.kind, gb.kind))
            continue
        covered_b.update(i for i in homes if i is not None)
        lost.append(LostTie(g.names, _layout(g), {n: _name_in_b(n, rb, group_b, dup_b, tensor_b) for n in g.names},
                            broken_into_duplicates=any(n in dup_b for n in g.names)))
    added = [AddedTie(gb.names, _layout(gb)) for i, gb in enumerate(rb.tie_groups) if i not in covered_b]
    return TieDiff(a=ra.source, b=rb.source, kept=tuple(kept), lost=tuple(lost), added=tuple(added),
                   layout_changed=tuple(layout_changed), kind_changed=tuple(kind_changed),
                   groups_a=len(ra.tie_groups), groups_b=len(rb.tie_groups),
                   declared_changed=tuple(declared_changes(ra.declared, rb.declared)))


def _name_in_b(n: str, rb: Report, group_b: dict[str, int], dup_b: dict[str, int], tensor_b: dict) -> NameInB:
    """What the name ``n`` of a lost tie is in B."""
    t = tensor_b.get(n)
    if t is None:
        return NameInB("absent")
    if n in group_b:
        state, others = "tied", rb.tie_groups[group_b[n]].names
    elif n in dup_b:
        state, others = "untied duplicate", rb.untied_duplicates[dup_b[n]].names
    else:
        return NameInB("untied", shape=t.shape, dtype=t.dtype)
    return NameInB(state, with_=tuple(m for m in others if m != n), shape=t.shape, dtype=t.dtype)


def _declared_state(t: LayerRow | None) -> DeclaredState | None:
    return None if t is None else DeclaredState(t.declared, t.by, t.physical, t.stored)


def declared_changes(da: Declared | None, db: Declared | None) -> list[DeclaredTieChange | DeclarationChange]:
    """Declarations that differ between two reports' ``declared`` sections.

    Two kinds of line: a declared tie (a pair of names) whose declared value changed, appeared or
    went away, with each side's physical and stored layers; and a declaration (a config key, an
    alias map) whose value changed, appeared or went away. A report without the section (schema
    version 1) declares nothing.
    """
    da, db = da or Declared(), db or Declared()
    ties_a = {tuple(sorted(t.names)): t for t in da.ties}
    ties_b = {tuple(sorted(t.names)): t for t in db.ties}
    out: list[DeclaredTieChange | DeclarationChange] = []
    for names in sorted(set(ties_a) | set(ties_b)):
        ta, tb = ties_a.get(names), ties_b.get(names)
        if ta is not None and tb is not None and ta.declared == tb.declared:
            continue
        out.append(DeclaredTieChange((ta or tb).names, _declared_state(ta), _declared_state(tb)))

    def keyed(d: Declared) -> dict[tuple[str, str], Any]:
        return {(x.kind, x.key or ""): x.value for x in d.declarations}

    decl_a, decl_b = keyed(da), keyed(db)
    missing = object()
    for kind, key in sorted(set(decl_a) | set(decl_b)):
        va, vb = decl_a.get((kind, key), missing), decl_b.get((kind, key), missing)
        if va != vb:
            out.append(DeclarationChange(kind, key, None if va is missing else va, None if vb is missing else vb,
                                         "both" if missing not in (va, vb) else "A only" if vb is missing else "B only"))
    return out
