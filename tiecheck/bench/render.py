"""Bench renderers: a terminal table (default), Markdown, CSV and JSON, each with the header.

The header (device, dtype, torch version, the exact command, the protocol) travels with every
format -- lines above the table, a Markdown list, ``#`` comment lines at the top of the CSV
(``pandas.read_csv(path, comment="#")`` reads it back), the ``header`` object in JSON -- so a
result file on its own says how it was measured.
"""

from __future__ import annotations

import io
import math
from typing import Optional

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
        return f"{int(round(v)):,}"
    if unit == "fraction":
        return f"{v:.1%}"
    if unit == "tokens/s":
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    if unit == "nats":
        return f"{v:.4f}"
    return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def _cell(r: Optional[Row]) -> str:
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


def _decimals(v: float, unit: str) -> Optional[int]:
    """Decimals giving ``v`` four significant digits, for units ``_num`` prints with ``.4g``; else None."""
    if unit in ("bytes", "count", "sequences", "fraction", "nats") or unit == "tokens/s" and v >= 100:
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
        ("command", h["command"]),
        ("device", h["device"]),
        ("host", h.get("host_load") or "load unknown"),
        ("software", f"torch {h['torch']}, tiecheck {h['tiecheck']}, python {h['python']}"),
        ("date", h["date"]),
        ("model", f"{h['model']}: {h['model_description']}"),
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
    items.append(("peak", f"{h['peak_tflops']:g} TFLOP/s ({h['peak_source']})" if h.get("peak_tflops")
                  else h["peak_source"]))
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
    return "\n".join(out) + "\n"


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
    result.to_frame().to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()
