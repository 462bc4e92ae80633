"""Statistics over seeds for ``--mode converge``: Student-t intervals, the paired difference
tied - untied per seed, the step from which it stays away from zero, and its verdict.

A seed is one independent replicate (a new initialisation and data order, shared by both
variants), so intervals are over seeds; with three seeds a bootstrap has only ten distinct means
to draw from and covers well under 95%, hence Student-t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tiecheck.bench import stats

MIN_SEEDS = 2  # a paired interval needs a spread of differences


# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; above, the Cornish-Fisher
# expansion around the normal quantile is within 1e-3 of the exact value.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """t(0.975, df): the half-width multiplier of a two-sided 95% interval."""
    if df < 1:
        raise ValueError("a t interval needs at least two values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its 95% Student-t interval."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean of ``values`` (one per seed) and its 95% t interval.

    Args:
        values: at least two numbers.

    Returns:
        The Interval; zero width when every value is equal.
    """
    x = np.asarray(values, dtype=float)
    if x.size < MIN_SEEDS:
        raise ValueError(f"an interval needs at least {MIN_SEEDS} values")
    half = t_quantile(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    m = float(x.mean())
    return Interval(m, m - half, m + half, int(x.size))


def paired_intervals(tied: np.ndarray, untied: np.ndarray) -> list[Interval]:
    """Per step, the interval of the per-seed differences tied - untied.

    Args:
        tied, untied: arrays [seed][step] of the same shape.

    Returns:
        One Interval per step.
    """
    d = np.asarray(tied, dtype=float) - np.asarray(untied, dtype=float)
    return [mean_interval(d[:, j]) for j in range(d.shape[1])]


def separation_step(steps: Sequence[int], diffs: Sequence[Interval]) -> int | None:
    """The first step from which every later interval excludes 0 on the same side; None if the
    interval at the last step contains 0.

    Args:
        steps: the evaluation steps, ascending.
        diffs: the paired difference's interval at each.

    Returns:
        The step, or None.
    """
    if not diffs or not diffs[-1].excludes_zero():
        return None
    side = diffs[-1].mean > 0
    first = len(diffs) - 1
    while first > 0 and diffs[first - 1].excludes_zero() and (diffs[first - 1].mean > 0) == side:
        first -= 1
    return steps[first]


def difference_verdict(d: Interval, what: str, unit: str = "nats") -> str:
    """The paired difference in the bench's words: a difference only when its interval excludes 0."""
    ci = f"95% CI {d.low:+.3f} to {d.high:+.3f}, {d.n} seeds"
    if not d.excludes_zero():
        return f"{what}: no measurable difference (tied - untied {d.mean:+.3f} {unit}, {ci} contains 0)"
    word = "lower" if d.mean < 0 else "higher"
    return f"{what}: tied {word} by {abs(d.mean):.3f} {unit} (tied - untied {d.mean:+.3f}, {ci})"


def ppl_verdict(d: Interval) -> str:
    """The perplexity ratio tied/untied = exp(loss difference), worded by ``stats.verdict``."""
    # rounds=0: this interval is over seeds, not the round bootstrap that stats' round minimum guards.
    r = stats.Estimate(math.exp(d.mean), math.exp(d.low), math.exp(d.high), d.n, 0)
    return stats.verdict(r, "validation perplexity", lower_is_better=False)
