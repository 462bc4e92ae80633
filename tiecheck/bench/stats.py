"""Medians, bootstrap intervals and the tied/untied ratio, from samples grouped by round.

A bench sample is one step's time; the steps of one round ran back to back and share its
conditions (clock, cache, thermal state), so they are not independent. The bootstrap
therefore resamples whole rounds (a cluster bootstrap) and then steps within each chosen
round; tied and untied draw the *same* rounds, which keeps the pairing of the interleaved
A/B/B/A schedule -- a slow period that hit both variants cancels in their ratio instead of
widening its interval. Intervals are percentile intervals of the resampled medians.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
CONFIDENCE = 0.95
# Below this many rounds a bootstrap interval rests on too few independent clusters to call a
# difference: with 3 rounds there are only 27 distinct resamplings of them.
MIN_ROUNDS_FOR_VERDICT = 6

Rounds = Sequence[Sequence[float]]  # samples[round][step]


@dataclass(frozen=True)
class Estimate:
    """A median with its bootstrap interval."""

    median: float
    low: float
    high: float
    n: int  # samples
    rounds: int = 0  # independent rounds (clusters) behind the interval

    def scaled(self, k: float) -> Estimate:
        return Estimate(self.median * k, self.low * k, self.high * k, self.n, self.rounds)

    def inverted(self, k: float = 1.0) -> Estimate:
        """``k / x``: a time becomes a rate; the interval's ends swap."""
        return Estimate(k / self.median, k / self.high, k / self.low, self.n, self.rounds)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _as_array(samples: Rounds) -> np.ndarray:
    arr = np.asarray([list(r) for r in samples], dtype=float)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError("samples must be a non-empty list of rounds with the same number of steps each")
    return arr


def _resample(arr: np.ndarray, rounds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Medians of ``len(rounds)`` resamples: rounds[b] picks the rounds, steps drawn within."""
    n_boot, n_rounds = rounds.shape
    steps = rng.integers(0, arr.shape[1], size=(n_boot, n_rounds, arr.shape[1]))
    picked = arr[rounds[:, :, None], steps]
    return np.median(picked.reshape(n_boot, -1), axis=1)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def estimate(samples: Rounds, n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """Median of all samples and its cluster-bootstrap interval."""
    arr = _as_array(samples)
    rng = np.random.default_rng(seed)
    rounds = rng.integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    lo, hi = _interval(_resample(arr, rounds, rng), confidence)
    return Estimate(float(np.median(arr)), lo, hi, arr.size, arr.shape[0])


def ratio(a: Rounds, b: Rounds, *, paired: bool = True, n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
          seed: int = 0) -> Estimate:
    """median(a) / median(b) with its bootstrap interval.

    ``paired``: a and b were measured in the same rounds (interleaved), so each resample
    draws the same round indices for both. Unpaired (variants measured one after the other)
    draws them independently.
    """
    x, y = _as_array(a), _as_array(b)
    if paired and x.shape[0] != y.shape[0]:
        raise ValueError("paired samples need the same number of rounds")
    rng = np.random.default_rng(seed)
    rx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    ry = rx if paired else rng.integers(0, y.shape[0], size=(n_boot, y.shape[0]))
    boot = _resample(x, rx, rng) / _resample(y, ry, rng)
    lo, hi = _interval(boot, confidence)
    return Estimate(float(np.median(x) / np.median(y)), lo, hi, min(x.size, y.size), min(x.shape[0], y.shape[0]))


def verdict(r: Estimate, what: str, lower_is_better: bool = True, subject: str = "tied") -> str:
    """The ratio in words: a difference is claimed only when the interval excludes 1.0."""
    ci = f"{r.low:.3f}-{r.high:.3f}"
    if r.rounds and r.rounds < MIN_ROUNDS_FOR_VERDICT:
        return (f"{what}: too few rounds ({r.rounds}) to call a difference (tied/untied {r.median:.3f}, "
                f"95% CI {ci}); use --rounds {MIN_ROUNDS_FOR_VERDICT} or more")
    if r.contains(1.0):
        return f"{what}: no measurable difference (tied/untied {r.median:.3f}, 95% CI {ci} contains 1)"
    better = (r.median < 1.0) == lower_is_better
    if lower_is_better:
        word = "faster" if better else "slower"
        pct = abs(1.0 - r.median) * 100
    else:
        word = "higher" if better else "lower"
        pct = abs(r.median - 1.0) * 100
    return f"{what}: {subject} {word} by {pct:.1f}% (tied/untied {r.median:.3f}, 95% CI {ci})"


def join_verdicts(parts: Sequence[str]) -> str | None:
    """The run's answers on one line -- throughput, memory and, where measured, loss -- each as its own verdict."""
    parts = [p for p in parts if p]
    return f"verdict: {'; '.join(parts)}" if parts else None
