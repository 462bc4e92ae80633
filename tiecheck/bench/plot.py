"""``--plot FILE``: tokens/s and memory per variant, with the bootstrap intervals as error bars.

matplotlib is an optional extra (``pip install 'tiecheck[plot]'``); ``require_matplotlib`` is
called before the bench starts, so a missing install fails in a second, not after the run.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

from tiecheck.bench.results import BenchResult
from tiecheck.errors import TiecheckError

VARIANTS = ("tied", "untied")
COLORS = {"tied": "#1f77b4", "untied": "#ff7f0e"}
# Memory parts get colours of their own: the variants' two colours would read as tied and untied.
PART_COLORS = {"weights": "#4d4d4d", "gradients": "#2ca02c", "optimizer state": "#9467bd"}


def require_matplotlib() -> None:
    if find_spec("matplotlib") is None:  # only its presence matters here: importing it takes a second
        raise TiecheckError("--plot needs matplotlib, which is not installed; "
                            "pip install 'tiecheck[plot]' (or matplotlib) and rerun")


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed, none opened). Imported
    here, not at the top: plots are the `plot` extra, and the bench imports this module whether or
    not ``--plot`` is given."""
    require_matplotlib()
    import matplotlib  # noqa: PLC0415 - the `plot` extra, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - idem, after the backend is chosen

    return plt


def plot(result: BenchResult, path: str) -> None:
    """Write the figure to ``path``; the format follows the extension (png, svg, pdf)."""
    plt = _pyplot()

    by = {(r.variant, r.metric): r for r in result.rows()}
    panels = [("tokens_per_s", "tokens/s")]
    if result.mode == "infer" and any((v, "decode_tokens_per_s") in by for v in VARIANTS):
        panels.append(("decode_tokens_per_s", "decode tokens/s"))
    if any((v, "max_batch_tokens_per_s") in by for v in VARIANTS):
        panels.append(("max_batch_tokens_per_s", "tokens/s at largest batch"))
    panels.append(("memory", "memory (MiB)"))

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels, strict=True):
        if metric == "memory":
            _memory_panel(ax, by)
        else:
            _rate_panel(ax, by, metric)
        ax.set_title(title)
    verdict = result.headline()
    fig.suptitle(result.header["title"] + (f"\n{verdict}" if verdict else ""), fontsize=9)
    _save(fig, path, plt)


def _rate_panel(ax, by, metric: str) -> None:
    names, values, err_lo, err_hi = [], [], [], []
    for v in VARIANTS:
        r = by.get((v, metric))
        if r is None:
            continue
        names.append(v if metric != "max_batch_tokens_per_s" else f"{v}\n(batch {int(by[(v, 'max_batch')].value)})")
        values.append(r.value)
        err_lo.append(r.value - r.ci_low)
        err_hi.append(r.ci_high - r.value)
    ax.bar(names, values, yerr=[err_lo, err_hi], capsize=6, color=[COLORS[n.split()[0]] for n in names])
    ratio = by.get(("tied/untied", metric))
    if ratio is not None:
        ax.set_xlabel(f"tied/untied {ratio.value:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}]"
                      + (f"\n{ratio.verdict}" if ratio.verdict else ""), fontsize=8)
    ax.set_ylabel("tokens/s")


def _memory_panel(ax, by) -> None:
    mib = 2 ** 20
    parts = [("weight_bytes", "weights"), ("grad_bytes", "gradients"), ("optimizer_state_bytes", "optimizer state")]
    present = [v for v in VARIANTS if (v, "weight_bytes") in by]
    bottom = [0.0] * len(present)
    for metric, label in parts:
        heights = [by[(v, metric)].value / mib if (v, metric) in by else 0.0 for v in present]
        if any(heights):
            ax.bar(present, heights, bottom=bottom, label=label, color=PART_COLORS[label])
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    peaks = [(i, by[(v, "peak_memory_bytes")].value / mib) for i, v in enumerate(present)
             if (v, "peak_memory_bytes") in by]
    if peaks:
        ax.scatter([i for i, _ in peaks], [p for _, p in peaks], marker="_", s=900, color="black", zorder=3,
                   label="peak device memory")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=7)


def plot_converge(result, path: str) -> None:
    """``--mode converge --plot FILE``: both validation curves with 95% bands, and the paired difference.

    Args:
        result: a ConvergeResult.
        path: the figure's file; the format follows the extension (png, svg, pdf).
    """
    plt = _pyplot()

    by = {(r.variant, r.metric, r.step): r for r in result.rows()}
    steps = result.steps
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.0))
    for v in VARIANTS:
        rows = [by[(v, "val_loss", s)] for s in steps]
        left.plot(steps, [r.value for r in rows], color=COLORS[v], label=v)
        left.fill_between(steps, [r.ci_low for r in rows], [r.ci_high for r in rows], color=COLORS[v], alpha=0.25)
    left.set_xlabel("step")
    left.set_ylabel("validation loss (nats)")
    left.set_title(f"validation loss, mean of {result.header['seeds']} seeds, 95% CI")
    left.legend()
    rows = [by[("tied-untied", "val_loss", s)] for s in steps]
    right.plot(steps, [r.value for r in rows], color="black", label="tied - untied")
    right.fill_between(steps, [r.ci_low for r in rows], [r.ci_high for r in rows], color="gray", alpha=0.35)
    right.axhline(0.0, color="red", linewidth=0.8)
    sep = result.separated_from()
    if sep is not None:
        right.axvline(sep, color="green", linestyle="--", linewidth=0.8, label=f"outside 0 from step {sep}")
    right.set_xlabel("step")
    right.set_ylabel("nats")
    right.set_title("paired difference (per seed), 95% CI")
    right.legend(fontsize=8)
    fig.suptitle(result.header["title"], fontsize=9)
    _save(fig, path, plt)


def _save(fig, path: str, plt) -> None:
    """Write the figure (its format from the file name) and close it, one line on failure."""
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:
        raise TiecheckError(f"--plot {path}: cannot write the figure ({e})") from e
    finally:
        plt.close(fig)
