"""Renderers: a Report as a terminal table, JSON, Markdown or CSV."""

from __future__ import annotations

import io

from tiecheck.analyses.duplicates import ContentPass
from tiecheck.analyses.layers import LayerRow
from tiecheck.flops.result import PARTS, FlopsResult, NoFlops
from tiecheck.report.report import Declared, Report
from tiecheck.report.text import clean, csv_cell, human_bytes, human_flops, markdown_text, shape_text

FORMATS = ("table", "json", "markdown", "csv")


def tabulate(*args, **kwargs) -> str:
    """``tabulate.tabulate``, imported when a table is first drawn: JSON and CSV draw none, and the
    import costs 70 ms of ``inspect --format json`` (a tenth of a 100,000-tensor file's own work)."""
    from tabulate import tabulate as draw  # noqa: PLC0415 - only the table and Markdown formats draw tables

    return draw(*args, **kwargs)


class _Printable:
    """A Report whose strings are safe for a terminal: tensor names, keys and notes come from the
    input file, and a newline or an escape sequence in one must neither break the table nor reach
    the terminal; for Markdown, nor become table syntax, HTML or a link. JSON and CSV escape on
    their own."""

    def __init__(self, report: Report, markdown: bool = False):
        self._report = report
        self._escape = markdown_text if markdown else clean

    def __getattr__(self, name: str):
        return self._escape(getattr(self._report, name))


def render(report: Report, fmt: str = "table") -> str:
    if fmt == "json":
        return report.to_json()
    if fmt == "csv":
        buf = io.StringIO()
        frame = report.to_frame()
        for col in ("shape", "tied_with"):
            frame[col] = frame[col].map(lambda v: " ".join(str(x) for x in v) if isinstance(v, list) else v)
        for col in frame.columns:  # names come from files: escaped, and never read as a formula
            if frame[col].dtype == object or str(frame[col].dtype) in ("str", "string"):
                frame[col] = frame[col].map(csv_cell)
        frame.to_csv(buf, index=False, lineterminator="\n")
        return buf.getvalue()
    if fmt in ("table", "markdown"):
        return _text(_Printable(report, markdown=fmt == "markdown"), markdown=fmt == "markdown")
    raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def _transposed_lines(content: ContentPass, h, tablefmt: str) -> list[str]:
    """The transposed-copy pass: the copies found, or what was compared to find none."""
    t = content.transposed
    if t is None:
        return []
    if not content.copies:
        if not t.buckets:
            return []  # no 2-D tensor met its swapped shape: nothing to say
        return ["", f"transposed copies: none ({t.tensors} 2-D tensors in {t.buckets} shape pairings, "
                    f"{t.full_comparisons} compared in full, read {human_bytes(t.bytes_read)})"]
    return ["", h(f"Transposed copies ({len(content.copies)})"),
            tabulate([[c.names[0], shape_text(c.shapes[0]), c.names[1], shape_text(c.shapes[1]), c.dtype,
                       human_bytes(c.nbytes)] for c in content.copies],
                     headers=["names", "shape", "holds its transpose", "shape", "dtype", "wasted"],
                     tablefmt=tablefmt),
            f"compared {t.tensors} 2-D tensors in {t.buckets} shape pairings ({t.full_comparisons} in "
            f"full), read {human_bytes(t.bytes_read)}"]


def _text(r: Report, markdown: bool) -> str:
    tablefmt = "github" if markdown else "simple"
    h = (lambda t: f"## {t}") if markdown else (lambda t: t)
    out: list[str] = []
    src = r.source
    title = f"{src.target} ({src.format}" + (f", key '{src.key}'" if src.key else "") + ")"
    out.append(f"# tiecheck: {title}" if markdown else f"tiecheck: {title}")
    for note in src.notes:
        out.append(f"{'- ' if markdown else '  '}{note}")
    remote = r.extra.get("remote") or {}  # a remote target (loaders/remote.py): what was fetched to read it
    if remote.get("requests"):
        out.append(f"{'- ' if markdown else '  '}fetched {human_bytes(remote['bytes_fetched'])} in "
                   f"{remote['requests']:,} range request{'s' if remote['requests'] != 1 else ''}")
    s = r.summary
    out += ["", h("Summary")]
    rows = [
        ["parameters", f"{s.params_unique:,}", f"{s.params_counted:,}", f"{s.params_saved:,}"],
        ["weight bytes", human_bytes(s.bytes_unique), human_bytes(s.bytes_counted), human_bytes(s.bytes_saved)],
        [f"training bytes ({s.optimizer})", human_bytes(s.training_bytes), human_bytes(s.training_bytes_counted),
         human_bytes(s.training_bytes_saved)],
    ]
    out.append(tabulate(rows, headers=["", "counted once", "per-name sum", "saved by ties"], tablefmt=tablefmt,
                        colalign=("left", "right", "right", "right")))
    if s.bytes_nested_views:
        out.append(f"views nested in or overlapping another listed tensor: {human_bytes(s.bytes_nested_views)} "
                   f"counted twice by a per-name sum (not a tie)")
    if s.bytes_unreachable:
        out.append(f"stored bytes no tensor reaches: {human_bytes(s.bytes_unreachable)} (views saved with their "
                   f"whole storage)")
    if len(s.by_dtype) > 1:
        out.append("")
        out.append(tabulate([[d.dtype, f"{d.params_unique:,}", human_bytes(d.bytes_unique)] for d in s.by_dtype],
                            headers=["dtype", "parameters", "bytes"], tablefmt=tablefmt))

    out += ["", h(f"Tie groups ({len(r.tie_groups)})")]
    if r.tie_groups:
        out.append(tabulate([[i, ("<br>" if markdown else "\n").join(g.names), g.kind, shape_text(g.shape), g.dtype,
                              human_bytes(g.bytes_saved)] for i, g in enumerate(r.tie_groups)],
                            headers=["#", "names", "kind", "shape", "dtype", "saves"], tablefmt=tablefmt))
    else:
        out.append("no tensors share memory")

    out += _declared_lines(r.declared, h, tablefmt, markdown)
    out += _packed_lines(r.declared, h, tablefmt)

    content = r.content or ContentPass(ran=False, reason="disabled")
    shown = [d for d in r.untied_duplicates if not d.constant]
    wasted = s.bytes_wasted_by_duplicates
    out += ["", h(f"Untied duplicates ({len(shown)}" + (f", {human_bytes(wasted)} wasted)" if wasted else ")"))]
    if not content.ran:
        out.append(f"content pass not run: {content.reason}")
    elif r.untied_duplicates:
        if shown:
            out.append(tabulate([[", ".join(d.names), shape_text(d.shape), d.dtype, human_bytes(d.bytes_wasted)]
                                 for d in shown], headers=["names", "shape", "dtype", "wasted"], tablefmt=tablefmt))
        hidden = len(r.untied_duplicates) - len(shown)
        if hidden:
            out.append(f"{hidden} group{'s' if hidden > 1 else ''} of constant-valued tensors (equal by construction, "
                       f"e.g. fresh LayerNorm weights) not shown; see --format json")
    else:
        out.append(f"none (compared {content.stats.tensors} tensors, read {human_bytes(content.stats.bytes_read)} "
                   f"of {human_bytes(content.stats.bytes_total)})")
    out += _transposed_lines(content, h, tablefmt)

    if r.tie_candidates:
        out += ["", h(f"Tie candidates ({len(r.tie_candidates)})")]
        out.append(tabulate([[", ".join(c.names), c.relation, shape_text(c.shape), human_bytes(c.bytes_saved)]
                             for c in r.tie_candidates],
                            headers=["names", "relation", "shape", "would save"], tablefmt=tablefmt))

    if r.flops:
        out += ["", h("Forward FLOPs"), *_flops_lines(r.flops, tablefmt)]

    ignored = [f for f in r.findings if f.ignored]
    kept = [f for f in r.findings if not f.ignored]
    out += ["", h(f"Findings ({len(kept)}" + (f", {len(ignored)} ignored)" if ignored else ")"))]
    if not r.findings:
        out.append("no findings")
    for f in kept:
        if markdown:
            out.append(f"- **{f.severity}** `{f.code}` {f.message}  \n  hint: {f.hint}")
        else:
            out.append(f"{f.severity:<8}{f.code} {f.message}")
            if f.hint:
                out.append(f"{'':<8}      hint: {f.hint}")
    # Ignored findings last, one line each: still shown, so an ignore never hides what it covers.
    for f in ignored:
        if markdown:
            out.append(f"- ignored ({f.ignored_by}): {f.severity} `{f.code}` {f.message}")
        else:
            out.append(f"{'ignored':<8}{f.code} ({f.severity}, by {f.ignored_by}) {f.message}")
    return "\n".join(out) + "\n"


def _declared_lines(declared: Declared | None, h, tablefmt: str, markdown: bool) -> list[str]:
    """Declared, physical and stored side by side, one row per declared tie (nothing when none is declared)."""
    if not declared or not (declared.ties or declared.declarations):
        return []
    out = ["", h(f"Declared ties ({len(declared.ties)})")]
    sep = "<br>" if markdown else "\n"
    if declared.ties:
        def said(t: LayerRow) -> str:
            value = ("tied" if t.declared else "untied") + (" (declarations disagree)" if t.conflict else "")
            return value + sep + sep.join(f"by {b}" for b in t.by)

        out.append(tabulate([[sep.join(t.names), said(t), t.physical, t.stored, human_bytes(t.nbytes)]
                             for t in declared.ties],
                            headers=["names", "declared", "physical", "stored", "size"], tablefmt=tablefmt))
    else:
        kinds = sorted({d.kind for d in declared.declarations})
        out.append(f"declarations found ({', '.join(kinds)}) name no pair of tensors")
    return out


def _packed_lines(declared: Declared | None, h, tablefmt: str) -> list[str]:
    """Embedding/head pairs stored in different formats (quantized heads), matched by meaning."""
    pairs = declared.packed_heads if declared else ()
    if not pairs:
        return []
    return ["", h(f"Heads stored in another format than the embedding ({len(pairs)})"),
            tabulate([[p.names[0], p.formats[0], p.names[1], p.formats[1], shape_text(p.shape),
                       human_bytes(p.head_bytes)] for p in pairs],
                     headers=["embedding", "stored as", "head", "stored as", "logical shape", "head bytes"],
                     tablefmt=tablefmt),
            "values in different formats are not compared; if the model is tied, the head bytes are a copy"]


def _count(n: int) -> str:
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _flops_lines(f: FlopsResult | NoFlops, tablefmt: str) -> list[str]:
    if not f.available:
        return [f"not available: {f.reason}"]
    shape = f"batch {f.batch_size} × seq {f.seq_len}"
    # An encoder-decoder's target tokens count with the source's (its family alone holds them).
    target = f.tgt_seq_len if f.family == "encoder-decoder" else None
    if target:
        shape += f" (target {target})"
    # An encoder-decoder's per-token figure divides by source and target tokens together: say so.
    per = "per token (source + target tokens)" if target else "per token"
    lines = [
        f"forward {human_flops(f.forward)} for {shape}; {human_flops(f.per_token)} {per}; "
        f"training step ≈ {human_flops(f.train_step_estimate)} (3 × forward)",
    ]
    total = f.forward or 1
    by_part = {k: int(f.by_part.get(k, 0)) for k in PARTS}
    # the experts and router rows appear for mixture-of-experts models only
    moe = bool(by_part["experts"] or by_part["router"])
    rows = [[part, human_flops(v), f"{v / total:.1%}"] for part, v in by_part.items()
            if moe or part not in ("experts", "router")]
    lines.append(tabulate(rows, headers=["part", "FLOPs", "share"], tablefmt=tablefmt, colalign=("left", "right", "right")))
    if f.attention_full_matrix is not None:
        lines.append(f"attention with the full score matrix: {human_flops(f.attention_full_matrix)} "
                     f"(sliding-window or chunked layers counted above over their window)")
    params = f.parameters or {}
    if params.get("total"):
        line = f"parameters {_count(params['total'])}"
        if params.get("moe_layers"):
            line += (f", active per token {_count(params['active_per_token'])} (routed top-k + shared + dense; "
                     f"{params['moe_layers']} MoE layers)")
        line += (f"; tied {_count(params['tied'])} ({params['tied_share_of_total']:.1%} of the total"
                 + (f", {params['tied_share_of_active']:.1%} of the active)" if params.get("moe_layers") else ")"))
        lines.append(line)
    lines.append(f"convention: {f.convention}")
    lines.append(f.note_on_tying)
    for note in f.notes:
        lines.append(f"note: {note}")
    if f.uncounted_ops:
        lines.append("not counted (no handle): " + ", ".join(f"{k} ×{v}" for k, v in sorted(f.uncounted_ops.items())))
    return lines
