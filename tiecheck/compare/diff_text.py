"""``tiecheck diff`` for people: a diff as a table or Markdown (JSON is the diff's own ``to_json``)."""

from __future__ import annotations

import json
from typing import Any

from tabulate import tabulate

from tiecheck.compare.tie_diff import DeclarationChange, DeclaredState, DeclaredTieChange, NameInB, TieDiff
from tiecheck.facts import assignment
from tiecheck.report.text import clean, markdown_text, shape_text


def _render_content(d: TieDiff, md: bool) -> list[str]:
    tablefmt = "github" if md else "simple"
    sep = "<br>" if md else "\n"
    h = (lambda t: f"## {t}") if md else (lambda t: t)
    out = ["", "tensors matched by content (names differ between the formats)", "",
           h(f"Tensor matches ({len(d.matches)})")]
    rows = []
    for m in d.matches:
        b = sep.join(f"{', '.join(x.names)} [{shape_text(x.shape)} {x.dtype}]" for x in m.b) or "-"
        how = sep.join(x.method for x in m.b) or "no match"
        rows.append([sep.join(m.a), f"{shape_text(m.shape)} {m.dtype}", b, how])
    out.append(tabulate(rows, headers=["A", "A layout", "B", "matched by"], tablefmt=tablefmt))
    out += ["", h(f"Ties of A ({len(d.kept) + len(d.lost)})")]
    rows = []
    for g in d.kept:
        what = "one tensor in B" + (" (tied there)" if g.tied_in_b else " (used under one name)")
        rows.append([sep.join(g.names), what, sep.join(", ".join(x.names) for x in g.in_b)])
    for g in d.lost:
        what = (f"became {len(g.in_b)} copies (+{g.bytes_copied:,} bytes)" if g.broken_into_duplicates
                else "lost: no tensor of B holds it")
        rows.append([sep.join(g.names), what, sep.join(", ".join(x.names) for x in g.in_b) or "-"])
    out.append(tabulate(rows, headers=["tied in A", "in B", "B tensors"], tablefmt=tablefmt) if rows
               else "A has no ties")
    if d.b_only:
        out += ["", h(f"Stored by B only ({len(d.b_only)})")]
        out.append(tabulate([[sep.join(x.names), shape_text(x.shape), x.dtype, f"{x.nbytes:,}"]
                             for x in d.b_only], headers=["B", "shape", "dtype", "bytes"], tablefmt=tablefmt))
    copies = sum(g.bytes_copied for g in d.lost)
    out += ["", f"ties of A: {len(d.kept)} one tensor in B, {len(d.broken_into_duplicates)} became copies "
                f"({copies:,} bytes), {len(d.lost) - len(d.broken_into_duplicates)} lost; B stores "
                f"{len(d.b_only)} tensor(s) A does not"]
    return out


def _render_declared(changes: tuple[DeclaredTieChange | DeclarationChange, ...], h, tablefmt: str,
                     sep: str) -> list[str]:
    """Declarations that changed: one row per declared tie, one per declaration key."""
    if not changes:
        return []

    def side(x: DeclaredState | None) -> str:
        if x is None:
            return "not declared"
        return sep.join(["tied" if x.declared else "untied", *(f"by {b}" for b in x.by), f"physical: {x.physical}",
                         f"stored: {x.stored}"])

    def value(v: Any, present: bool) -> str:
        return json.dumps(v, sort_keys=True) if present else "absent"

    rows = []
    for c in changes:
        if isinstance(c, DeclaredTieChange):
            rows.append([sep.join(c.names), side(c.a), side(c.b)])
        else:
            label = c.kind if c.key in ("", c.kind) else f"{c.kind} ({c.key})"
            rows.append([label, value(c.a, c.where != "B only"), value(c.b, c.where != "A only")])
    return ["", h(f"Declarations that changed ({len(changes)})"),
            tabulate(rows, headers=["declared tie or key", "A", "B"], tablefmt=tablefmt)]


def _state(n: str, s: NameInB) -> str:
    text = s.state
    if s.with_:
        text += " with " + ", ".join(s.with_)
    if s.shape is not None:
        text += f" [{shape_text(s.shape)} {s.dtype}]"
    return f"{n}: {text}"


def render_diff(d: TieDiff, fmt: str = "table") -> str:
    """The diff as a table, JSON or Markdown."""
    if fmt == "json":
        return d.to_json()
    if fmt not in ("table", "markdown"):
        raise ValueError(f"unknown format {fmt!r}; choose one of: table, json, markdown")
    md = fmt == "markdown"
    d = markdown_text(d) if md else clean(d)  # names come from files
    tablefmt = "github" if md else "simple"
    sep = "<br>" if md else "\n"
    h = (lambda t: f"## {t}") if md else (lambda t: t)
    src = lambda s: f"{s.target} ({s.format})"  # noqa: E731 - a one-line formatter, named for the lines below
    out = ["# tiecheck diff" if md else "tiecheck diff",
           f"{'- ' if md else '  '}A: {src(d.a)}: {d.groups_a} tie group{'s' if d.groups_a != 1 else ''}",
           f"{'- ' if md else '  '}B: {src(d.b)}: {d.groups_b} tie group{'s' if d.groups_b != 1 else ''}"]
    if d.matching == "content":
        return "\n".join(out + _render_content(d, md)) + "\n"
    out += ["", h(f"Lost ties ({len(d.lost)})")]
    if d.lost:
        out.append(tabulate([[sep.join(g.names), shape_text(g.layout.shape) + " " + g.layout.dtype,
                              sep.join(_state(n, s) for n, s in g.in_b.items())] for g in d.lost],
                            headers=["tied in A", "A", "in B"], tablefmt=tablefmt))
    else:
        out.append("none: every tie of A is present in B")
    if d.kind_changed:
        out += ["", h(f"Ties whose kind changed ({len(d.kind_changed)})")]
        out.append(tabulate([[sep.join(c.names), c.a, c.b] for c in d.kind_changed],
                            headers=["names", "kind in A", "kind in B"], tablefmt=tablefmt))
        if any(c.b == "distinct_parameters" for c in d.kind_changed):
            out.append("hint: distinct Parameters over one memory do not share gradients; re-tie by assigning the "
                       "Parameter itself (e.g. after load_state_dict(assign=True))")
    if d.layout_changed:
        out += ["", h(f"Kept ties whose shape or dtype changed ({len(d.layout_changed)})")]
        out.append(tabulate([[sep.join(c.names), f"{shape_text(c.a.shape)} {c.a.dtype}",
                              f"{shape_text(c.b.shape)} {c.b.dtype}"] for c in d.layout_changed],
                            headers=["names", "A", "B"], tablefmt=tablefmt))
    grown = [g for g in d.kept if g.grown]
    if grown:
        out += ["", h(f"Kept ties that grew in B ({len(grown)})")]
        out.append(tabulate([[sep.join(g.names), sep.join(g.grown)] for g in grown],
                            headers=["tied in A", "also tied in B"], tablefmt=tablefmt))
    if d.added:
        out += ["", h(f"Added ties ({len(d.added)})")]
        out.append(tabulate([[sep.join(g.names), g.layout.kind, shape_text(g.layout.shape), g.layout.dtype]
                             for g in d.added],
                            headers=["tied in B only", "kind", "shape", "dtype"], tablefmt=tablefmt))
    out += _render_declared(d.declared_changed, h, tablefmt, sep)
    out += ["", f"kept {len(d.kept)}, lost {len(d.lost)} ({len(d.broken_into_duplicates)} broken into untied "
                f"duplicates), added {len(d.added)}, layout changed {len(d.layout_changed)}, "
                f"kind changed {len(d.kind_changed)}"]
    for g in d.lost:
        present = [n for n, s in g.in_b.items() if s.state != "absent"]
        if len(present) < 2:
            continue
        if any(g.in_b[n].state == "untied" for n in present):
            # Different values in B: the copies diverged (trained or merged apart), so re-tying would throw one away.
            out.append(f"hint: B holds {', '.join(present)} with different content: decide which copy is right. If B "
                       f"trained or merged them apart on purpose, declare them untied (tie_word_embeddings=false) and "
                       f"keep both; otherwise save B with the tie intact")
        else:
            out.append(f"hint: re-tie {', '.join(present)} in B: model.tie_weights(), or {assignment(present)}")
    if d.lost and any(s.state == "absent" for g in d.lost for s in g.in_b.values()):
        out.append("hint: names absent from B are often dropped on save because they are tied (safetensors); point "
                   "diff at the Hugging Face model folder, whose architecture re-ties them")
    return "\n".join(out) + "\n"
