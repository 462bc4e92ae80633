"""Bench renderers: a terminal table (default), Markdown, CSV and JSON, each with the header.

The header (device, dtype, torch version, the exact command, the protocol) travels with every
format -- lines above the table, a Markdown list, ``#`` comment lines at the top of the CSV
(``pandas.read_csv(path, comment="#")`` reads it back), the ``header`` object in JSON -- so a
result file on its own says how it was measured.
"""

from __future__ import annotations

import io
import math

from tabulate import tabulate

from tiecheck.bench.results import METRICS, BenchResult, Row
from tiecheck.report.text import human_bytes

FORMATS = ("table", "json", "csv", "markdown")


def render(result: BenchResult, fmt: str = "table") -> str:
    if fmt == "json":
        return result.to_json()
    if fmt == "csv":
        return _csv(result)
    if fmt in ("table", "markdown"):
        return _text(result, markdown=fmt == "markdown")
    raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------------------
# Numbers

def _num(v: float, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if unit == "bytes":
        return human_bytes(v)
    if unit in ("count", "sequences"):
        return f"{round(v):,}"
    if unit == "fraction":
        return f"{v:.1%}"
    if unit == "tokens/s":
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    if unit == "nats":
        return f"{v:.4f}"
    return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def _cell(r: Row | None) -> str:
    if r is None:
        return ""
    if r.variant == "tied/untied":
        s = f"{r.value:.4f}" if r.ci_low is None else f"{r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"
        return s
    s = _num(r.value, r.unit)
    if r.ci_low is not None:
        decimals = _decimals(r.value, r.unit)
        if decimals is not None:  # the value and its bounds to the same decimals: [46.40, 54.76]
            return f"{r.value:,.{decimals}f} [{r.ci_low:,.{decimals}f}, {r.ci_high:,.{decimals}f}]"
        s += f" [{_num(r.ci_low, r.unit)}, {_num(r.ci_high, r.unit)}]"
    return s


def _decimals(v: float, unit: str) -> int | None:
    """Decimals giving ``v`` four significant digits, for units ``_num`` prints with ``.4g``; else None."""
    if unit in ("bytes", "count", "sequences", "fraction", "nats") or (unit == "tokens/s" and v >= 100):
        return None
    if v == 0 or abs(v) >= 1e4:
        return 0 if v else 3
    return max(0, 3 - math.floor(math.log10(abs(v))))


def _label(metric: str, unit: str) -> str:
    label = METRICS[metric][0]
    return f"{label} ({unit})" if unit in ("ms", "tokens/s") and unit not in label else label


# ------------------------------------------------------------------------------------------
# Header

def header_items(result: BenchResult) -> list[tuple[str, str]]:
    """(key, text) pairs describing the run, in display order."""
    h = result.header
    items = [
        *_run_items(h),
        ("precision", h["precision"]),
    ]
    if h.get("optimizer"):
        items.append(("optimizer", h["optimizer"]))
    runs = h["order"].split()
    order = " ".join(runs) if len(runs) <= 12 else f"{' '.join(runs[:8])} ... ({len(runs)} runs)"
    items.append(("protocol", f"{h['rounds']} rounds x {h['steps_per_round']} steps per variant, interleaved "
                              f"{order or '(nothing ran)'} (A = tied, B = untied); {h['warmup_steps']} warm-up "
                              "steps per variant excluded; medians with 95% bootstrap intervals over rounds"))
    if h.get("decode"):
        items.append(("decode", h["decode"]))
    if h.get("flops_per_step"):
        items.append(("flops", f"{h['flops_per_step'] / 1e9:,.2f} GFLOP per step ({h['flops_convention']})"))
    peak = (f"MFU is against {h['peak_tflops']:g} TFLOP/s ({h['peak_source']})" if h.get("peak_tflops")
            else h["peak_source"])
    if h.get("matmul_tflops"):
        peak += (f"; a {h['matmul_dtype']} 8192^3 matmul measured {h['matmul_tflops']:,.0f} TFLOP/s on this device "
                 "at the start" + (f" ({h['matmul_tflops'] / h['peak_tflops']:.0%} of that peak)"
                                   if h.get("peak_tflops") else ""))
    items.append(("peak", peak))
    return items


def check_lines(result: BenchResult) -> list[str]:
    if not result.checks:
        return ["none ran"]
    return [f"{'pass' if ok else 'FAIL'}  {name}" for name, ok in result.checks.items()]


# ------------------------------------------------------------------------------------------
# Text

def _table_rows(result: BenchResult) -> list[list[str]]:
    by: dict[tuple[str, str], Row] = {(r.variant, r.metric): r for r in result.rows()}
    out = []
    for metric in METRICS:
        cells = [by.get((v, metric)) for v in ("tied", "untied", "tied/untied")]
        if not any(cells):
            continue
        unit = next(c.unit for c in cells[:2] if c is not None) if any(cells[:2]) else METRICS[metric][1]
        out.append([_label(metric, unit)] + [_cell(c) for c in cells])
    return out


def _text(result: BenchResult, markdown: bool) -> str:
    h = result.header
    out: list[str] = []
    if markdown:
        out += [f"## {h['title']}", ""]
        out += [f"- **{k}**: {v}" for k, v in header_items(result)]
    else:
        out.append(h["title"])
        width = max(len(k) for k, _ in header_items(result))
        out += [f"  {k:<{width}}  {v}" for k, v in header_items(result)]
    out.append("")
    headers = ["metric", "tied", "untied", "tied/untied"]
    rows = _table_rows(result)
    if rows:
        out.append(tabulate(rows, headers=headers, tablefmt="github" if markdown else "simple",
                            colalign=("left", "right", "right", "right")))
    else:
        out.append("nothing measured")
    out.append("")
    bullet = "- " if markdown else "  "
    out += ["checks:" if not markdown else "**checks**", *[f"{bullet}{c}" for c in check_lines(result)]]
    verdicts = result.verdicts()
    if verdicts:
        out += ["", "verdicts:" if not markdown else "**verdicts**", *[f"{bullet}{v}" for v in verdicts]]
    failures = result.failures()
    if failures:
        out += ["", "not measured:" if not markdown else "**not measured**", *[f"{bullet}{f}" for f in failures]]
    if result.notes:
        out += ["", "notes:" if not markdown else "**notes**", *[f"{bullet}{n}" for n in result.notes]]
    out += _verdict_line(result, markdown)
    return "\n".join(out) + "\n"


def _verdict_line(result, markdown: bool) -> list[str]:
    """The last line of a table or Markdown result: every answer of the run joined."""
    line = result.verdict_line()
    if not line:
        return []
    return ["", f"**{line}**" if markdown else line]


# ------------------------------------------------------------------------------------------
# CSV

def _csv(result: BenchResult) -> str:
    buf = io.StringIO()
    buf.write(f"# {result.header['title']}\n")
    for k, v in header_items(result):
        buf.write(f"# {k}: {v}\n")
    for c in check_lines(result):
        buf.write(f"# check: {c}\n")
    for f in result.failures():
        buf.write(f"# not measured: {f}\n")
    if result.verdict_line():
        buf.write(f"# {result.verdict_line()}\n")
    result.to_frame().to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# --mode converge (a ConvergeResult: rows carry a step)

def converge_header_items(result) -> list[tuple[str, str]]:
    """(key, text) pairs describing a convergence run, in display order."""
    h = result.header
    share = f", the tie {h['tie_share']:.0%} of the untied model" if h.get("tie_share") is not None else ""
    return [
        *_run_items(h),
        ("parameters", f"tied {h['params_tied']:,}, untied {h['params_untied']:,} (vocabulary {h['vocab_size']:,}"
                       f"{share})"),
        ("corpus", h["corpus"]),
        ("train split", h["train_split"]),
        ("validation", h["val_split"]),
        ("tokenizer", h["tokenizer"]),
        ("optimizer", h["optimizer"]),
        ("protocol", f"{h['seeds']} seeds (from {h['first_seed']}) x {h['steps']} steps of {h['batch_size']} x "
                     f"{h['seq_len']} tokens; per seed both variants start from the same weights (the untied head "
                     f"a copy of the embedding) and see the same batches in the same order; validation every "
                     f"{h['eval_every']} steps; means over seeds with 95% Student-t intervals; tied - untied "
                     "paired by seed"),
    ]


def _ci(v: float, lo: float, hi: float, fmt: str) -> str:
    return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _converge_tables(result) -> tuple[list[list[str]], list[list[str]]]:
    rows = result.rows()
    by = {(r.variant, r.metric, r.step): r for r in rows}
    last = result.steps[-1]
    final = []
    for metric, label, fmt in (("val_loss", "validation loss (nats)", ".4f"), ("val_ppl", "validation perplexity", ".2f"),
                               ("train_loss", "training loss (nats)", ".4f")):
        cells = []
        for v in ("tied", "untied"):
            r = by.get((v, metric, last))
            cells.append(_ci(r.value, r.ci_low, r.ci_high, fmt) if r else "")
        d = by.get(("tied-untied", metric, last)) or by.get(("tied/untied", metric, last))
        if d is None:
            cells.append("")
        elif d.variant == "tied/untied":
            cells.append(_ci(d.value, d.ci_low, d.ci_high, ".3f") + " (ratio)")
        else:
            cells.append(_ci(d.value, d.ci_low, d.ci_high, "+.4f"))
        final.append([label, *cells])
    final.append(["parameters (counted once)", *[f"{result.params.get(v, 0):,}" for v in ("tied", "untied")],
                  f"{result.params.get('tied', 0) - result.params.get('untied', 0):+,}"])
    if result.train_ms:
        r = result.throughput()
        final.append(["training tokens/s (all seeds)", *[_num(result.tokens_per_s(v), "tokens/s")
                                                        for v in ("tied", "untied")],
                      _ci(r.mean, r.low, r.high, ".3f") + " (ratio)" if r else ""])
    if result.state_bytes:
        t, u = result.state_bytes.get("tied", 0), result.state_bytes.get("untied", 0)
        final.append(["weights+grads+AdamW state", human_bytes(t), human_bytes(u),
                      f"{'-' if t < u else '+'}{human_bytes(abs(t - u))}"])
    curve = []
    for step in result.steps:
        t, u, d = (by.get((v, "val_loss", step)) for v in ("tied", "untied", "tied-untied"))
        tr = by.get(("tied-untied", "train_loss", step))
        outside = "yes" if d and (d.ci_low > 0 or d.ci_high < 0) else "no"
        curve.append([str(step), f"{t.value:.4f}", f"{u.value:.4f}", _ci(d.value, d.ci_low, d.ci_high, "+.4f"),
                      outside, f"{tr.value:+.4f}" if tr else ""])
    return final, curve


def render_converge(result, fmt: str = "table") -> str:
    """A ConvergeResult as table (default), markdown, csv or json; the header travels with each."""
    if fmt == "json":
        return result.to_json()
    if fmt == "csv":
        buf = io.StringIO()
        buf.write(f"# {result.header['title']}\n")
        for k, v in converge_header_items(result):
            buf.write(f"# {k}: {v}\n")
        for c in check_lines(result):
            buf.write(f"# check: {c}\n")
        if result.verdict_line():
            buf.write(f"# {result.verdict_line()}\n")
        result.to_frame().to_csv(buf, index=False, lineterminator="\n")
        return buf.getvalue()
    if fmt not in ("table", "markdown"):
        raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    markdown = fmt == "markdown"
    h, out = result.header, []
    if markdown:
        out += [f"## {h['title']}", "", *[f"- **{k}**: {v}" for k, v in converge_header_items(result)]]
    else:
        items = converge_header_items(result)
        width = max(len(k) for k, _ in items)
        out += [h["title"], *[f"  {k:<{width}}  {v}" for k, v in items]]
    final, curve = _converge_tables(result)
    tablefmt = "github" if markdown else "simple"
    out += ["", f"final (step {result.steps[-1]}), mean over seeds [95% CI]:" if not markdown
            else f"**final (step {result.steps[-1]})**, mean over seeds [95% CI]", ""]
    out.append(tabulate(final, headers=["metric", "tied", "untied", "tied - untied"], tablefmt=tablefmt,
                        colalign=("left", "right", "right", "right"), disable_numparse=True))
    per_seed = ", ".join(f"{x:+.4f}" for x in result.per_seed_diff())
    out += ["", f"validation loss tied - untied per seed at step {result.steps[-1]}: {per_seed}"]
    out += ["", "validation loss curve:" if not markdown else "**validation loss curve**", ""]
    out.append(tabulate(curve, headers=["step", "tied", "untied", "tied - untied [95% CI]", "outside 0",
                                        "train loss tied - untied"], tablefmt=tablefmt, disable_numparse=True,
                        colalign=("right", "right", "right", "right", "left", "right")))
    bullet = "- " if markdown else "  "
    out += ["", "checks:" if not markdown else "**checks**", *[f"{bullet}{c}" for c in check_lines(result)]]
    out += ["", "verdicts:" if not markdown else "**verdicts**", *[f"{bullet}{v}" for v in result.verdicts()]]
    if result.notes:
        out += ["", "notes:" if not markdown else "**notes**", *[f"{bullet}{n}" for n in result.notes]]
    out += _verdict_line(result, markdown)
    return "\n".join(out) + "\n"


def _run_items(h: dict) -> list[tuple[str, str]]:
    """The header items every bench result shows first: what ran, where, with what, when."""
    return [
        ("command", h["command"]),
        ("device", h["device"]),
        ("host", h.get("host_load") or "load unknown"),
        ("software", f"torch {h['torch']}, tiecheck {h['tiecheck']}, python {h['python']}"),
        ("date", h["date"]),
        ("model", f"{h['model']}: {h['model_description']}"),
    ]
