"""``tiecheck.diff``: compare the tie structure of two targets.

Before and after fine-tuning, a format conversion or quantization, the question is whether
every tie survived. Each side is analysed like ``inspect`` does (or taken from a Report, or a
report saved as JSON), then tie groups are matched by name:

* kept: the same names tied on both sides (``grown`` when B ties more names to them);
* lost: names tied in A that B does not tie together; each name's state in B is said
  (tied elsewhere, an untied duplicate with equal content, untied with other content, absent);
* added: ties in B among names A did not tie;
* layout changes: a kept tie whose shape or dtype differs (a resized vocabulary, a bf16 cast);
* kind changes: a kept tie whose kind differs in substance -- one Parameter in A, distinct
  Parameters over the same memory in B (gradients no longer shared), or a plain alias turned
  into a transposed one. (A module's ``same_parameter`` and a file's ``shared_storage`` are the
  same tie seen two ways, not a change.)

A tie of A missing in B, or degraded in kind, is the failure: exit code 1, like ``inspect
--expect-tied``.

Across formats whose names differ by design (a PyTorch checkpoint against its ONNX or GGUF
export), ties are matched by content instead: every tensor of A is looked for in B by its
values -- the same bytes, the transpose, or either after a lossless dtype conversion -- and by
shape and position when no content matches; each row says how it was matched. A tie of A is
then one tensor in B (kept), several tensors in B (became copies, and what they cost), or
nowhere (lost); what B stores that matches nothing of A is listed too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from tiecheck import __version__
from tiecheck.analyses.expect import assignment, kinds_match
from tiecheck.api import analyze, analyze_subject, collector
from tiecheck.errors import TargetError
from tiecheck.loaders import load_target
from tiecheck.loaders.subject import Subject
from tiecheck.report import Report
from tiecheck.report.text import clean, json_text, markdown_text, shape_text

DIFF_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TieDiff:
    a: dict[str, Any]  # the sources
    b: dict[str, Any]
    kept: list[dict[str, Any]] = field(default_factory=list)
    lost: list[dict[str, Any]] = field(default_factory=list)
    added: list[dict[str, Any]] = field(default_factory=list)
    layout_changed: list[dict[str, Any]] = field(default_factory=list)
    kind_changed: list[dict[str, Any]] = field(default_factory=list)
    groups_a: int = 0
    groups_b: int = 0
    # "names" (same format) or "content" (across formats: tensors matched by their values)
    matching: str = "names"
    matches: list[dict[str, Any]] = field(default_factory=list)
    b_only: list[dict[str, Any]] = field(default_factory=list)
    # Declarations that differ between A and B (a declared tie's value, a config key's value).
    declared_changed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when a tie present in A is missing in B or changed kind, else 0."""
        return 1 if self.lost or self.kind_changed else 0

    @property
    def broken_into_duplicates(self) -> list[dict[str, Any]]:
        return [g for g in self.lost if g["broken_into_duplicates"]]

    def to_dict(self) -> dict[str, Any]:
        d = self._base_dict()
        if self.matching == "content":
            d["matching"] = "content"
            d["summary"]["became_copies"] = len(self.broken_into_duplicates)
            d["summary"]["b_only"] = len(self.b_only)
            d["matches"] = self.matches
            d["b_only"] = self.b_only
        return d

    def _base_dict(self) -> dict[str, Any]:
        return {
            "schema_version": DIFF_SCHEMA_VERSION,
            "tiecheck_version": __version__,
            "a": self.a,
            "b": self.b,
            "summary": {"tie_groups_a": self.groups_a, "tie_groups_b": self.groups_b, "kept": len(self.kept),
                        "lost": len(self.lost), "added": len(self.added),
                        "layout_changed": len(self.layout_changed), "kind_changed": len(self.kind_changed),
                        "broken_into_duplicates": len(self.broken_into_duplicates),
                        "declared_changed": len(self.declared_changed), "exit_code": self.exit_code},
            "kept": self.kept,
            "lost": self.lost,
            "added": self.added,
            "layout_changed": self.layout_changed,
            "kind_changed": self.kind_changed,
            "declared_changed": self.declared_changed,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json_text(self.to_dict(), indent=indent)


def _as_report(target: Any, **kwargs) -> Report:
    if isinstance(target, Report):
        return target
    if isinstance(target, dict) and "tie_groups" in target and "schema_version" in target:
        return Report.from_dict(target)
    saved = _saved_report(target)
    if saved is not None:
        return saved
    return analyze(target, **kwargs)


def _saved_report(target: Any) -> Report | None:
    """A report written by ``inspect --format json``, recognised by content."""
    if not isinstance(target, (str, Path)):
        return None
    p = Path(target)
    try:
        if not p.is_file() or p.stat().st_size > (64 << 20):
            return None
        with open(p, "rb") as fh:
            if fh.read(64).lstrip()[:1] != b"{":
                return None
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or "tie_groups" not in obj or "schema_version" not in obj:
        return None
    try:
        report = Report.from_dict(obj)
    except (ValueError, KeyError) as e:
        raise TargetError(f"{p}: a tiecheck report that cannot be read ({e})") from e
    # The header names what was compared: the saved report, and what it was made from.
    source = {**report.source, "target": str(p), "format": f"saved report of {report.source.get('target')}"}
    return dataclasses.replace(report, source=source)


def diff(a: Any, b: Any, *, key: str | None = None, trust_pickle: bool = False, trust_remote_code: bool = False,
         duplicates: bool = True, progress: Callable[[int, str], None] | None = None) -> TieDiff:
    """Compare the ties of two targets (anything ``analyze`` accepts, a Report, or a saved JSON report).

    The content pass runs by default so that a tie broken into equal copies is recognised as
    such; ``duplicates=False`` skips it. ``progress(units_done, label)`` is called as each of
    four phases starts (reading A, reading B, analysing A, analysing B), as ``analyze`` calls it.
    """
    with collector(enabled=False):  # as in analyze: two checkpoints of 100,000 tensors each
        return _diff(a, b, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                     duplicates=duplicates, step=progress or (lambda n, label: None))


def _diff(a: Any, b: Any, *, key: str | None, trust_pickle: bool, trust_remote_code: bool,
          duplicates: bool, step: Callable[[int, str], None]) -> TieDiff:
    kwargs = dict(key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code, duplicates=duplicates)
    step(0, f"reading {_label(a)}")
    sa = _as_subject(a, **kwargs)
    step(1, f"reading {_label(b)}")
    sb = _as_subject(b, **kwargs)

    def report(target: Any, subject: Subject | None, units: int) -> Report:
        step(units, f"analysing {_label(target)}")
        return _as_report(target, **kwargs) if subject is None else analyze_subject(subject, duplicates=duplicates)

    ra, rb = report(a, sa, 1), report(b, sb, 1)
    step(1, "comparing")
    if sa is not None and sb is not None and by_content(sa, sb):
        return compare_content(ra, rb, sa, sb)
    return compare(ra, rb)


def _label(target: Any) -> str:
    """A target as a progress label: its path or name, else what it is."""
    return str(target) if isinstance(target, (str, Path)) else type(target).__name__


# Formats whose tensor names differ from the PyTorch model's by design.
RENAMING_FORMATS = ("ONNX", "GGUF")


def _as_subject(target: Any, *, key=None, trust_pickle=False, trust_remote_code=False, duplicates=True
                ) -> Subject | None:
    """The loaded target, or None for a Report or a saved report (which hold no tensors)."""
    if isinstance(target, (Report, dict)) or _saved_report(target) is not None:
        return None
    return load_target(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code)


def by_content(sa: Subject, sb: Subject) -> bool:
    """Match by content when one side is an export that renames tensors and the formats differ."""
    fa, fb = sa.source.format, sb.source.format
    return fa != fb and (fa in RENAMING_FORMATS or fb in RENAMING_FORMATS)


def _layout(g: dict) -> dict[str, Any]:
    return {"shape": list(g["shape"]), "dtype": g["dtype"], "kind": g["kind"]}


def compare(ra: Report, rb: Report) -> TieDiff:
    """The tie structure of B against A's, from two reports."""
    group_b = {n: i for i, g in enumerate(rb.tie_groups) for n in g["names"]}
    dup_b = {n: i for i, d in enumerate(rb.untied_duplicates) for n in d["names"]}
    tensor_b = {t["name"]: t for t in rb.tensors}
    kept, lost, layout_changed, kind_changed = [], [], [], []
    covered_b: set[int] = set()
    for g in ra.tie_groups:
        names = list(g["names"])
        homes = {group_b.get(n) for n in names}
        if len(homes) == 1 and None not in homes:
            (i,) = homes
            gb = rb.tie_groups[i]
            covered_b.add(i)
            entry = {"names": names, **_layout(g)}
            extra = sorted(set(gb["names"]) - set(names))
            if extra:
                entry["grown"] = extra
            kept.append(entry)
            if (list(gb["shape"]), gb["dtype"]) != (list(g["shape"]), g["dtype"]):
                layout_changed.append({"names": names, "a": _layout(g), "b": _layout(gb)})
            if not kinds_match(g["kind"], gb["kind"]):
                kind_changed.append({"names": names, "a": g["kind"], "b": gb["kind"]})
            continue
        covered_b.update(i for i in homes if i is not None)
        in_b = {}
        for n in names:
            t = tensor_b.get(n)
            if t is None:
                in_b[n] = {"state": "absent"}
            elif n in group_b:
                in_b[n] = {"state": "tied", "with": [m for m in rb.tie_groups[group_b[n]]["names"] if m != n]}
            elif n in dup_b:
                in_b[n] = {"state": "untied duplicate",
                           "with": [m for m in rb.untied_duplicates[dup_b[n]]["names"] if m != n]}
            else:
                in_b[n] = {"state": "untied"}
            if t is not None:
                in_b[n].update(shape=t["shape"], dtype=t["dtype"])
        dups = {dup_b[n] for n in names if n in dup_b}
        lost.append({"names": names, **_layout(g), "in_b": in_b,
                     "broken_into_duplicates": bool(dups)})
    added = []
    for i, gb in enumerate(rb.tie_groups):
        if i in covered_b:
            continue
        added.append({"names": list(gb["names"]), **_layout(gb)})
    return TieDiff(a=ra.source, b=rb.source, kept=kept, lost=lost, added=added, layout_changed=layout_changed,
                   kind_changed=kind_changed, groups_a=len(ra.tie_groups), groups_b=len(rb.tie_groups),
                   declared_changed=declared_changes(ra.declared, rb.declared))


def _declared_state(t: dict | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {"declared": "tied" if t["declared"] else "untied", "by": list(t["by"]), "physical": t["physical"],
            "stored": t["stored"]}


def declared_changes(da: dict | None, db: dict | None) -> list[dict[str, Any]]:
    """Declarations that differ between two reports' ``declared`` sections.

    Two kinds of line: a declared tie (a pair of names) whose declared value changed, appeared or
    went away, with each side's physical and stored layers; and a declaration (a config key, an
    alias map) whose value changed, appeared or went away. A report without the section (schema
    version 1) declares nothing.
    """
    da, db = da or {}, db or {}
    ties_a = {tuple(sorted(t["names"])): t for t in da.get("ties", [])}
    ties_b = {tuple(sorted(t["names"])): t for t in db.get("ties", [])}
    out: list[dict[str, Any]] = []
    for names in sorted(set(ties_a) | set(ties_b)):
        ta, tb = ties_a.get(names), ties_b.get(names)
        if ta is not None and tb is not None and bool(ta["declared"]) == bool(tb["declared"]):
            continue
        out.append({"what": "tie", "names": list((ta or tb)["names"]), "a": _declared_state(ta),
                    "b": _declared_state(tb)})

    def keyed(d: dict) -> dict[tuple[str, str], Any]:
        return {(x["kind"], (x.get("origin") or {}).get("key", "")): x.get("value") for x in d.get("declarations", [])}

    decl_a, decl_b = keyed(da), keyed(db)
    missing = object()
    for kind, key in sorted(set(decl_a) | set(decl_b)):
        va, vb = decl_a.get((kind, key), missing), decl_b.get((kind, key), missing)
        if va != vb:
            out.append({"what": "declaration", "kind": kind, "key": key,
                        "a": None if va is missing else va, "b": None if vb is missing else vb,
                        "in": "both" if missing not in (va, vb) else "A only" if vb is missing else "B only"})
    return out


# -- across formats: tensors matched by content -----------------------------------------------

def _units(report: Report, subject: Subject) -> list[dict[str, Any]]:
    """One entry per memory: a tie group's names together, every other tensor alone, in order."""
    grouped = {n: i for i, g in enumerate(report.tie_groups) for n in g["names"]}
    shapes = (report.extra.get("gguf") or {}).get("tensor_types", {})
    units: list[dict[str, Any]] = []
    seen: set[int] = set()
    for t in report.tensors:
        gi = grouped.get(t["name"])
        if gi is not None:
            if gi in seen:
                continue
            seen.add(gi)
            names = list(report.tie_groups[gi]["names"])
            rep = t["name"]
        else:
            names, rep = [t["name"]], t["name"]
        if not t["numel"]:
            continue
        # A quantized GGUF tensor is stored as byte rows; position matching uses its logical shape.
        logical = shapes.get(rep, {}).get("shape", t["shape"])
        units.append({"names": names, "rep": rep, "shape": list(t["shape"]), "logical": list(logical),
                      "dtype": t["dtype"], "bytes": t["bytes"], "tensor": subject.tensors.get(rep)})
    return units


def compare_content(ra: Report, rb: Report, sa: Subject, sb: Subject) -> TieDiff:
    """The ties of A against B when names differ: every memory of A found in B by its values."""
    from tiecheck.loaders.content import value_match  # noqa: PLC0415 - reads tensor values with torch

    ua, ub = _units(ra, sa), _units(rb, sb)
    by_numel: dict[int, list[int]] = {}
    for j, u in enumerate(ub):
        if u["tensor"] is not None:
            by_numel.setdefault(u["tensor"].numel(), []).append(j)
    found: dict[int, list[tuple[int, str]]] = {}
    used_b: set[int] = set()
    for i, u in enumerate(ua):
        t = u["tensor"]
        if t is None:
            continue
        for j in by_numel.get(t.numel(), []):
            method = value_match(t, ub[j]["tensor"])
            if method:
                found.setdefault(i, []).append((j, method))
                used_b.add(j)
    for i, hits in found.items():
        # An untied tensor equal to several of B's (constant LayerNorm weights, say): the one
        # under the same name is its match; the others are someone else's.
        same = [(j, m) for j, m in hits if set(ub[j]["names"]) & set(ua[i]["names"])]
        if len(ua[i]["names"]) == 1 and len(hits) > 1 and same:
            found[i] = same
    used_b = {j for hits in found.values() for j, _ in hits}
    for i, u in enumerate(ua):  # no content match: unused B memories of the same shape, in order
        if i in found:
            continue
        hits = []
        for j, v in enumerate(ub):
            if j not in used_b and (v["logical"] == u["shape"] or v["logical"] == u["shape"][::-1]):
                hits.append((j, "shape and position" if v["logical"] == u["shape"] else "transposed shape and position"))
                used_b.add(j)
                # One B memory holding as many names as A's tie is the tie kept; a B memory with
                # fewer names leaves A's other names to further memories of that shape (copies).
                if sum(len(ub[k]["names"]) for k, _ in hits) >= len(u["names"]):
                    break
        if hits:
            found[i] = hits
    matches, kept, lost = [], [], []
    for i, u in enumerate(ua):
        hits = found.get(i, [])
        matches.append({"a": u["names"], "shape": u["shape"], "dtype": u["dtype"],
                        "b": [{"names": ub[j]["names"], "shape": ub[j]["shape"], "dtype": ub[j]["dtype"],
                               "method": m} for j, m in hits]})
        if len(u["names"]) < 2:
            continue
        entry = {"names": u["names"], "shape": u["shape"], "dtype": u["dtype"],
                 "kind": next(g["kind"] for g in ra.tie_groups if g["names"] == u["names"]),
                 "in_b": [{"names": ub[j]["names"], "method": m, "bytes": ub[j]["bytes"]} for j, m in hits]}
        if len(hits) == 1:
            kept.append({**entry, "tied_in_b": len(ub[hits[0][0]]["names"]) > 1})
        else:
            copies = sorted(ub[j]["bytes"] for j, _ in hits)
            lost.append({**entry, "broken_into_duplicates": len(hits) > 1,
                         "bytes_copied": sum(copies[:-1]) if len(hits) > 1 else 0})
    matched_b = {j for hits in found.values() for j, _ in hits}
    b_only = [{"names": v["names"], "shape": v["shape"], "dtype": v["dtype"], "bytes": v["bytes"]}
              for j, v in enumerate(ub) if j not in matched_b]
    tied_a = {tuple(sorted(n)) for g in ra.tie_groups for n in [g["names"]]}
    a_of_b: dict[int, set[int]] = {}
    for i, hits in found.items():
        for j, _ in hits:
            a_of_b.setdefault(j, set()).add(i)
    added = [{"names": list(g["names"]), "kind": g["kind"], "shape": list(g["shape"]), "dtype": g["dtype"]}
             for j, v in enumerate(ub) for g in rb.tie_groups if g["names"] == v["names"]
             if not any(tuple(sorted(ua[i]["names"])) in tied_a for i in a_of_b.get(j, ()))]
    return TieDiff(a=ra.source, b=rb.source, kept=kept, lost=lost, added=added, groups_a=len(ra.tie_groups),
                   groups_b=len(rb.tie_groups), matching="content", matches=matches, b_only=b_only)


def _render_content(d: TieDiff, md: bool) -> list[str]:
    tablefmt = "github" if md else "simple"
    sep = "<br>" if md else "\n"
    h = (lambda t: f"## {t}") if md else (lambda t: t)
    out = ["", "tensors matched by content (names differ between the formats)", "",
           h(f"Tensor matches ({len(d.matches)})")]
    rows = []
    for m in d.matches:
        b = sep.join(f"{', '.join(x['names'])} [{shape_text(x['shape'])} {x['dtype']}]" for x in m["b"]) or "-"
        how = sep.join(x["method"] for x in m["b"]) or "no match"
        rows.append([sep.join(m["a"]), f"{shape_text(m['shape'])} {m['dtype']}", b, how])
    out.append(tabulate(rows, headers=["A", "A layout", "B", "matched by"], tablefmt=tablefmt))
    out += ["", h(f"Ties of A ({len(d.kept) + len(d.lost)})")]
    rows = []
    for g in d.kept:
        what = "one tensor in B" + (" (tied there)" if g["tied_in_b"] else " (used under one name)")
        rows.append([sep.join(g["names"]), what, sep.join(", ".join(x["names"]) for x in g["in_b"])])
    for g in d.lost:
        what = (f"became {len(g['in_b'])} copies (+{g['bytes_copied']:,} bytes)" if g["broken_into_duplicates"]
                else "lost: no tensor of B holds it")
        rows.append([sep.join(g["names"]), what, sep.join(", ".join(x["names"]) for x in g["in_b"]) or "-"])
    out.append(tabulate(rows, headers=["tied in A", "in B", "B tensors"], tablefmt=tablefmt) if rows
               else "A has no ties")
    if d.b_only:
        out += ["", h(f"Stored by B only ({len(d.b_only)})")]
        out.append(tabulate([[sep.join(x["names"]), shape_text(x["shape"]), x["dtype"], f"{x['bytes']:,}"]
                             for x in d.b_only], headers=["B", "shape", "dtype", "bytes"], tablefmt=tablefmt))
    copies = sum(g["bytes_copied"] for g in d.lost)
    out += ["", f"ties of A: {len(d.kept)} one tensor in B, {len(d.broken_into_duplicates)} became copies "
                f"({copies:,} bytes), {len(d.lost) - len(d.broken_into_duplicates)} lost; B stores "
                f"{len(d.b_only)} tensor(s) A does not"]
    return out


# -- rendering -------------------------------------------------------------------------------

def _render_declared(changes: list[dict[str, Any]], h, tablefmt: str, sep: str) -> list[str]:
    """Declarations that changed: one row per declared tie, one per declaration key."""
    if not changes:
        return []

    def side(x: dict | None) -> str:
        if x is None:
            return "not declared"
        return sep.join([x["declared"], *(f"by {b}" for b in x["by"]), f"physical: {x['physical']}",
                         f"stored: {x['stored']}"])

    def value(v: Any, present: bool) -> str:
        return json.dumps(v, sort_keys=True) if present else "absent"

    rows = []
    for c in changes:
        if c["what"] == "tie":
            rows.append([sep.join(c["names"]), side(c["a"]), side(c["b"])])
        else:
            label = c["kind"] if c["key"] in ("", c["kind"]) else f"{c['kind']} ({c['key']})"
            rows.append([label, value(c["a"], c["in"] != "B only"),
                         value(c["b"], c["in"] != "A only")])
    return ["", h(f"Declarations that changed ({len(changes)})"),
            tabulate(rows, headers=["declared tie or key", "A", "B"], tablefmt=tablefmt)]


def _state(n: str, s: dict) -> str:
    text = s["state"]
    if s.get("with"):
        text += " with " + ", ".join(s["with"])
    if "shape" in s:
        text += f" [{shape_text(s['shape'])} {s['dtype']}]"
    return f"{n}: {text}"


def render_diff(d: TieDiff, fmt: str = "table") -> str:
    if fmt == "json":
        return d.to_json()
    if fmt not in ("table", "markdown"):
        raise ValueError(f"unknown format {fmt!r}; choose one of: table, json, markdown")
    md = fmt == "markdown"
    d = markdown_text(d) if md else clean(d)  # names come from files
    tablefmt = "github" if md else "simple"
    sep = "<br>" if md else "\n"
    h = (lambda t: f"## {t}") if md else (lambda t: t)
    src = lambda s: f"{s['target']} ({s['format']})"  # noqa: E731
    out = ["# tiecheck diff" if md else "tiecheck diff",
           f"{'- ' if md else '  '}A: {src(d.a)}: {d.groups_a} tie group{'s' if d.groups_a != 1 else ''}",
           f"{'- ' if md else '  '}B: {src(d.b)}: {d.groups_b} tie group{'s' if d.groups_b != 1 else ''}"]
    if d.matching == "content":
        return "\n".join(out + _render_content(d, md)) + "\n"
    out += ["", h(f"Lost ties ({len(d.lost)})")]
    if d.lost:
        out.append(tabulate([[sep.join(g["names"]), shape_text(g["shape"]) + " " + g["dtype"],
                              sep.join(_state(n, s) for n, s in g["in_b"].items())] for g in d.lost],
                            headers=["tied in A", "A", "in B"], tablefmt=tablefmt))
    else:
        out.append("none: every tie of A is present in B")
    if d.kind_changed:
        out += ["", h(f"Ties whose kind changed ({len(d.kind_changed)})")]
        out.append(tabulate([[sep.join(c["names"]), c["a"], c["b"]] for c in d.kind_changed],
                            headers=["names", "kind in A", "kind in B"], tablefmt=tablefmt))
        if any(c["b"] == "distinct_parameters" for c in d.kind_changed):
            out.append("hint: distinct Parameters over one memory do not share gradients; re-tie by assigning the "
                       "Parameter itself (e.g. after load_state_dict(assign=True))")
    if d.layout_changed:
        out += ["", h(f"Kept ties whose shape or dtype changed ({len(d.layout_changed)})")]
        out.append(tabulate([[sep.join(c["names"]), f"{shape_text(c['a']['shape'])} {c['a']['dtype']}",
                              f"{shape_text(c['b']['shape'])} {c['b']['dtype']}"] for c in d.layout_changed],
                            headers=["names", "A", "B"], tablefmt=tablefmt))
    grown = [g for g in d.kept if g.get("grown")]
    if grown:
        out += ["", h(f"Kept ties that grew in B ({len(grown)})")]
        out.append(tabulate([[sep.join(g["names"]), sep.join(g["grown"])] for g in grown],
                            headers=["tied in A", "also tied in B"], tablefmt=tablefmt))
    if d.added:
        out += ["", h(f"Added ties ({len(d.added)})")]
        out.append(tabulate([[sep.join(g["names"]), g["kind"], shape_text(g["shape"]), g["dtype"]] for g in d.added],
                            headers=["tied in B only", "kind", "shape", "dtype"], tablefmt=tablefmt))
    out += _render_declared(d.declared_changed, h, tablefmt, sep)
    out += ["", f"kept {len(d.kept)}, lost {len(d.lost)} ({len(d.broken_into_duplicates)} broken into untied "
                f"duplicates), added {len(d.added)}, layout changed {len(d.layout_changed)}, "
                f"kind changed {len(d.kind_changed)}"]
    for g in d.lost:
        present = [n for n, s in g["in_b"].items() if s["state"] != "absent"]
        if len(present) < 2:
            continue
        if any(g["in_b"][n]["state"] == "untied" for n in present):
            # Different values in B: the copies diverged (trained or merged apart), so re-tying would throw one away.
            out.append(f"hint: B holds {', '.join(present)} with different content: decide which copy is right. If B "
                       f"trained or merged them apart on purpose, declare them untied (tie_word_embeddings=false) and "
                       f"keep both; otherwise save B with the tie intact")
        else:
            out.append(f"hint: re-tie {', '.join(present)} in B: model.tie_weights(), or {assignment(present)}")
    if d.lost and any(s["state"] == "absent" for g in d.lost for s in g["in_b"].values()):
        out.append("hint: names absent from B are often dropped on save because they are tied (safetensors); point "
                   "diff at the Hugging Face model folder, whose architecture re-ties them")
    return "\n".join(out) + "\n"
