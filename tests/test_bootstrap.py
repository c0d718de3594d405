"""Bootstrap intervals (evaluation/stats.py) cover the true mean at about the nominal rate.

400 repetitions: coverage of a 95 % interval has a binomial standard deviation of 1.1 points, so
[91.5 %, 98.5 %] is a ±3 sd band. A too narrow interval (e.g. resampled means divided by n) falls
below it; a too wide one above it: in the paired case an interval that resamples the two models'
prompts independently covers ~100 %, because the shared prompt difficulty does not cancel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minillm_rl.evaluation.stats import BootstrapConfig, Interval, bootstrap_mean, paired_difference

REPETITIONS, LOW, HIGH = 400, 0.915, 0.985
CFG = BootstrapConfig(resamples=1000)


def _coverage(draw, true_value: float, interval) -> float:
    rng = np.random.default_rng(2024)
    hits = 0
    for repetition in range(REPETITIONS):
        found = interval(*draw(rng), BootstrapConfig(resamples=CFG.resamples, seed=repetition))
        hits += found.low <= true_value <= found.high
    return hits / REPETITIONS


def test_interval_of_a_mean_covers_at_the_nominal_rate():
    # Skewed per-prompt values (gamma, shape 4, mean 2), like per-token KLs of 100 prompts.
    coverage = _coverage(lambda rng: (rng.gamma(4.0, 0.5, size=100),), 2.0, bootstrap_mean)
    print(f"coverage of the mean's interval: {coverage:.3f}")
    assert LOW <= coverage <= HIGH, coverage


def test_paired_interval_covers_the_difference_at_the_nominal_rate():
    def draw(rng):
        difficulty = rng.normal(0.0, 3.0, size=80)  # shared by both models: cancels when paired
        return (difficulty + rng.normal(0.2, 0.5, size=80), difficulty + rng.normal(0.0, 0.5, size=80))

    coverage = _coverage(draw, 0.2, paired_difference)
    print(f"coverage of the paired interval: {coverage:.3f}")
    assert LOW <= coverage <= HIGH, coverage

    def unpaired(values, baseline, cfg):
        a, b = bootstrap_mean(values, cfg), bootstrap_mean(baseline, BootstrapConfig(cfg.resamples, seed=cfg.seed + 1))
        half = math.hypot(a.high - a.mean, b.high - b.mean)
        return Interval(a.mean - b.mean, a.mean - b.mean - half, a.mean - b.mean + half, a.num_prompts)

    coverage = _coverage(draw, 0.2, unpaired)
    print(f"coverage of an unpaired interval: {coverage:.3f}")
    assert coverage > HIGH, "the check must be able to tell a paired interval from an unpaired one"


def test_undefined_prompts_are_left_out_and_the_seed_fixes_the_draws():
    values = [1.0, None, 3.0, float("nan"), 2.0]
    found = bootstrap_mean(values, CFG)
    assert found.num_prompts == 3 and found.mean == pytest.approx(2.0)
    assert 1.0 <= found.low < 2.0 < found.high <= 3.0
    many = np.random.default_rng(0).normal(size=50).tolist()
    assert bootstrap_mean(many, CFG) == bootstrap_mean(many, CFG) != bootstrap_mean(many, BootstrapConfig(seed=1))
    difference = paired_difference([1.0, 2.0, None, 4.0], [0.5, None, 1.0, 3.0], CFG)
    assert difference.num_prompts == 2 and difference.mean == pytest.approx(0.75)
    empty = bootstrap_mean([None, None], CFG)
    assert empty.num_prompts == 0 and empty.to_dict() == {"mean": None, "low": None, "high": None, "num_prompts": 0}


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="resamples=10; expected an int >= 100"):
        BootstrapConfig(resamples=10)
    with pytest.raises(ValueError, match="confidence=1.0"):
        BootstrapConfig(confidence=1.0)
    with pytest.raises(ValueError, match="3 values but 2 baseline values"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
