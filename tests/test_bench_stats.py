"""The bench's statistics read directly: the cluster bootstrap on samples small enough that every
resampling's median is known by hand, the interval's percentiles against numpy's, and the verdict's
words at each boundary (the round minimum, an interval ending exactly on 1)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tiecheck.bench import stats


def test_the_interval_is_numpys_percentiles_of_the_resampled_medians():
    # The 90% interval of 0..100 is its 5th and 95th percentiles, which are 5 and 95.
    assert stats._interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert stats._interval(np.arange(101.0), 0.5) == (25.0, 75.0)


def test_rounds_are_resampled_from_every_round():
    # Two one-step rounds, 0 and 10: a resample of two rounds has median 0, 5 or 10, and with 2,000
    # resamples both ends are drawn (each with probability 1/4), so the 95% interval is [0, 10].
    e = stats.estimate([[0.0], [10.0]])
    assert e == stats.Estimate(5.0, 0.0, 10.0, 2, 2)


def test_each_resample_draws_as_many_rounds_as_were_run():
    # Three rounds 0, 10, 20: the median of three drawn rounds is 0 or 20 with probability 7/27 each (two
    # or three of them drawn), so the 30th and 70th percentiles are both 10. A resample of one round
    # would put them at 0 and 20.
    assert stats.estimate([[0.0], [10.0], [20.0]], confidence=0.4) == stats.Estimate(10.0, 10.0, 10.0, 3, 3)
    assert stats.ratio([[1.0], [2.0], [3.0]], [[1.0], [1.0], [1.0]], confidence=0.4) == \
        stats.Estimate(2.0, 2.0, 2.0, 3, 3)
    r = stats.ratio([[1.0], [1.0], [1.0]], [[1.0], [2.0], [4.0]], paired=False, confidence=0.4)
    assert (r.low, r.high) == (0.5, 0.5)


def test_steps_are_resampled_from_every_step_of_a_round():
    # One round of two steps: the steps drawn within it give the same three medians.
    e = stats.estimate([[0.0, 10.0]])
    assert e == stats.Estimate(5.0, 0.0, 10.0, 2, 1)


def test_one_sample_and_constant_samples_have_a_zero_width_interval():
    assert stats.estimate([[5.0]]) == stats.Estimate(5.0, 5.0, 5.0, 1, 1)
    assert stats.estimate([[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]) == stats.Estimate(2.0, 2.0, 2.0, 6, 3)


def test_the_defaults_are_seed_0_and_2000_resamples():
    rng = np.random.default_rng(7)
    samples = rng.lognormal(0, 0.3, (5, 4)).tolist()
    assert stats.estimate(samples) == stats.estimate(samples, n_boot=2000, seed=0)
    assert stats.estimate(samples) != stats.estimate(samples, seed=1)
    assert stats.ratio(samples, samples[::-1]) == stats.ratio(samples, samples[::-1], paired=True, n_boot=2000, seed=0)


@pytest.mark.parametrize("bad", [[], [[]], [[[1.0]]]])
def test_samples_that_are_not_rounds_of_steps_are_refused(bad):
    with pytest.raises(ValueError, match="samples must be a non-empty list of rounds"):
        stats.estimate(bad)


def test_paired_ratios_draw_the_same_rounds_for_both():
    # Each round's a/b is exactly 2, whatever the round: a paired resample's ratio is 2 every time.
    b = [[1.0], [10.0], [100.0]]
    a = [[2 * v for v in r] for r in b]
    assert stats.ratio(a, b, paired=True) == stats.Estimate(2.0, 2.0, 2.0, 3, 3)
    unpaired = stats.ratio(a, b, paired=False)
    assert unpaired.low < 1.0 < 10.0 < unpaired.high
    # a's rounds are 1 and 100 over b's 1 and 1: a resample's ratio is 1, 50.5 or 100.
    assert stats.ratio([[1.0], [100.0]], [[1.0], [1.0]]) == stats.Estimate(50.5, 1.0, 100.0, 2, 2)


def test_unpaired_ratios_take_any_number_of_rounds_and_draw_every_round_of_each():
    # b's rounds are 1 and 100: its resampled median is 1, 50.5 or 100, so a/b spans 1/100 to 1/1.
    r = stats.ratio([[1.0], [1.0], [1.0]], [[1.0], [100.0]], paired=False)
    assert (r.median, r.low, r.high, r.n, r.rounds) == (pytest.approx(1 / 50.5), 0.01, 1.0, 2, 2)
    with pytest.raises(ValueError, match="paired samples need the same number of rounds"):
        stats.ratio([[1.0], [1.0], [1.0]], [[1.0], [100.0]], paired=True)


def test_an_estimate_scales_and_is_frozen():
    e = stats.Estimate(2.0, 1.0, 3.0, 4, 5)
    assert e.scaled(2.0) == stats.Estimate(4.0, 2.0, 6.0, 4, 5)
    assert stats.Estimate(2.0, 1.0, 3.0, 4).rounds == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.median = 1.0  # type: ignore[misc]


def test_an_interval_ending_on_1_contains_it():
    assert stats.Estimate(1.05, 1.0, 1.1, 60, 10).contains(1.0)
    assert stats.Estimate(0.95, 0.9, 1.0, 60, 10).contains(1.0)
    for r in (stats.Estimate(1.05, 1.0, 1.1, 60, 10), stats.Estimate(0.95, 0.9, 1.0, 60, 10)):
        assert "no measurable difference" in stats.verdict(r, "step time")


def test_the_round_minimum_is_six_and_an_estimate_without_rounds_is_not_held_to_it():
    five, six = stats.Estimate(1.05, 1.03, 1.07, 50, 5), stats.Estimate(1.05, 1.03, 1.07, 60, 6)
    assert stats.verdict(five, "step time") == (
        "step time: too few rounds (5) to call a difference (tied/untied 1.050, 95% CI 1.030-1.070); "
        "use --rounds 6 or more")
    assert stats.verdict(six, "step time") == "step time: tied slower by 5.0% (tied/untied 1.050, 95% CI 1.030-1.070)"
    # converge's intervals are over seeds, not rounds: rounds=0, judged on the interval alone.
    assert stats.verdict(stats.Estimate(1.05, 1.03, 1.07, 3), "x").startswith("x: tied slower by 5.0%")


@pytest.mark.parametrize(("median", "lower_is_better", "word"), [
    (0.9, True, "faster by 10.0%"), (1.1, True, "slower by 10.0%"),
    (1.1, False, "higher by 10.0%"), (0.9, False, "lower by 10.0%"),
])
def test_the_verdicts_word_and_percentage(median, lower_is_better, word):
    r = stats.Estimate(median, median - 0.01, median + 0.01, 60, 10)
    assert stats.verdict(r, "m", lower_is_better=lower_is_better, subject="shared") == (
        f"m: shared {word} (tied/untied {median:.3f}, 95% CI {median - 0.01:.3f}-{median + 0.01:.3f})")


def test_verdicts_join_on_one_line_without_the_empty_ones():
    assert stats.join_verdicts(["a: x", "", "b: y"]) == "verdict: a: x; b: y"
    assert stats.join_verdicts(["", ""]) is None
    assert stats.join_verdicts([]) is None
