"""The converge bench's statistics over seeds read directly: Student-t quantiles against the exact
quantile (the regularized incomplete beta, inverted by mpmath), intervals whose half-width is worked
out by hand, the separation step at its edges, and the verdicts' words."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from tiecheck.bench.seeds import (
    Interval,
    difference_verdict,
    mean_interval,
    paired_intervals,
    ppl_verdict,
    separation_step,
    t_quantile,
)

mp = pytest.importorskip("mpmath")


def _exact_t975(df: int) -> float:
    """t(0.975, df) from the t distribution's CDF, 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2, solved for t."""
    with mp.workdps(30):
        def cdf(t):
            return 1 - mp.betainc(mp.mpf(df) / 2, mp.mpf(1) / 2, 0, df / (df + t * t), regularized=True) / 2
        return float(mp.findroot(lambda t: cdf(t) - mp.mpf("0.975"), 2.0))


def test_the_table_holds_each_quantile_to_three_decimals():
    for df in range(1, 31):
        assert t_quantile(df) == round(_exact_t975(df), 3), df


@pytest.mark.parametrize("df", [31, 100, 300, 500, 1000])
def test_above_the_table_the_expansion_is_within_its_next_terms_size(df):
    # Cornish-Fisher to 1/df^2: what is left is of order 1/df^3 (under 3/df^3 here), plus the 1e-8 that
    # z = 1.959964 is given to.
    assert abs(t_quantile(df) - _exact_t975(df)) < 3 / df ** 3 + 2e-8


def test_fewer_than_two_values_have_no_interval():
    with pytest.raises(ValueError, match="a t interval needs at least two values"):
        t_quantile(0)
    with pytest.raises(ValueError, match="an interval needs at least 2 values"):
        mean_interval([1.0])
    assert mean_interval([1.0, 3.0]) == Interval(2.0, 2.0 - 12.706, 2.0 + 12.706, 2)  # sd sqrt(2), / sqrt(2)


def test_the_half_width_is_t_times_the_sample_sd_over_root_n():
    # 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3, t(0.975, 3) = 3.182.
    half = 3.182 * math.sqrt(14 / 3) / math.sqrt(4)
    i = mean_interval([1.0, 2.0, 3.0, 6.0])
    assert (i.mean, i.low, i.high, i.n) == (3.0, pytest.approx(3.0 - half), pytest.approx(3.0 + half), 4)
    assert mean_interval([5.0, 5.0, 5.0]) == Interval(5.0, 5.0, 5.0, 3)


def test_an_interval_touching_zero_does_not_exclude_it_and_is_frozen():
    assert not Interval(0.1, 0.0, 0.2, 3).excludes_zero()
    assert not Interval(-0.1, -0.2, 0.0, 3).excludes_zero()
    assert Interval(0.1, 0.01, 0.2, 3).excludes_zero()
    assert Interval(-0.1, -0.2, -0.01, 3).excludes_zero()
    with pytest.raises(dataclasses.FrozenInstanceError):
        Interval(0.1, 0.0, 0.2, 3).mean = 1.0  # type: ignore[misc]


def test_paired_intervals_are_per_step_over_the_seeds():
    # Three seeds, two steps: step 0's differences are 1, 2, 3; step 1's are all 0.
    tied = np.array([[2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])
    untied = np.array([[1.0, 5.0], [1.0, 5.0], [1.0, 5.0]])
    first, second = paired_intervals(tied, untied)
    assert first == mean_interval([1.0, 2.0, 3.0])
    assert second == Interval(0.0, 0.0, 0.0, 3)


def _at(mean: float) -> Interval:
    """An interval of half-width 0.01 around ``mean``."""
    return Interval(mean, mean - 0.01, mean + 0.01, 3)


def test_the_separation_step_is_the_start_of_the_last_stretch_on_one_side():
    steps = [0, 10, 20, 30]
    assert separation_step(steps, [_at(-1.0), _at(-1.0), _at(-1.0), _at(-1.0)]) == 0  # separated throughout
    assert separation_step(steps, [_at(1.0), _at(1.0), _at(1.0), _at(1.0)]) == 0
    assert separation_step(steps, [_at(-1.0), _at(0.0), _at(-1.0), _at(-1.0)]) == 20
    assert separation_step(steps, [_at(-1.0), _at(1.0), _at(1.0), _at(1.0)]) == 10
    assert separation_step(steps, [_at(1.0), _at(1.0), _at(1.0), _at(0.0)]) is None
    assert separation_step([], []) is None
    assert separation_step([5], [_at(-1.0)]) == 5


def test_the_difference_verdicts_words():
    assert difference_verdict(Interval(-0.1, -0.15, -0.05, 3), "validation loss") == (
        "validation loss: tied lower by 0.100 nats (tied - untied -0.100, 95% CI -0.150 to -0.050, 3 seeds)")
    assert difference_verdict(Interval(0.2, 0.1, 0.3, 4), "train loss", unit="bits") == (
        "train loss: tied higher by 0.200 bits (tied - untied +0.200, 95% CI +0.100 to +0.300, 4 seeds)")
    assert difference_verdict(Interval(0.0, -0.1, 0.1, 2), "validation loss") == (
        "validation loss: no measurable difference (tied - untied +0.000 nats, 95% CI -0.100 to +0.100, 2 seeds "
        "contains 0)")


def test_the_perplexity_verdict_is_the_exponentiated_difference_and_not_held_to_a_round_minimum():
    # Two seeds: stats' round minimum (6) must not apply to an interval over seeds.
    d = Interval(math.log(1.1), math.log(1.05), math.log(1.15), 2)
    assert ppl_verdict(d) == "validation perplexity: tied higher by 10.0% (tied/untied 1.100, 95% CI 1.050-1.150)"
    assert ppl_verdict(Interval(0.0, -0.1, 0.1, 2)).startswith("validation perplexity: no measurable difference")
