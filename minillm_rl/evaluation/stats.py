"""Percentile bootstrap intervals over prompts: one model's mean, and a paired difference of two.

The unit of resampling is the prompt: each prompt's value (already averaged over the sampling
seeds, and over training runs in a report) is one observation, so the interval says how much the
mean would move on another draw of held-out prompts of the same kind. It does not include the
spread between training runs (the report shows that separately, as ± std over runs).

Percentile bootstrap: resample the n values with replacement ``resamples`` times, take the mean of
each resample, and report the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of
those means. With the default 1000 resamples an end point's own Monte-Carlo error is about 0.085
standard errors of the mean (sqrt(0.025 * 0.975 / 1000) / phi(1.96), normal approximation), i.e.
~2 % of the interval's width; raise it for published numbers. The draws come from ``seed`` alone,
so a result is reproducible. ``scipy.stats.bootstrap`` does the same, but scipy is only a test
dependency here and a bootstrap of a mean is one vectorised resample.

The paired interval of ``a - b`` resamples prompts jointly, i.e. it is the bootstrap of the
per-prompt differences: prompt difficulty, shared by both models, cancels, which is what makes
a small difference between two methods detectable on a few hundred prompts.

A value of ``None`` or NaN is "undefined for this prompt" (e.g. distinct-2 of a one-token answer);
such prompts are left out (of a difference: when undefined on either side), and ``num_prompts``
says how many remained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Resampled index matrices are built in blocks of at most this many entries (bounded memory for
# many prompts x many resamples).
_BLOCK_ELEMENTS = 2**22


@dataclass(frozen=True)
class BootstrapConfig:
    """``resamples`` >= 100, ``confidence`` in (0, 1), ``seed`` of the resampling."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.resamples, int) and self.resamples >= 100):
            raise ValueError(f"BootstrapConfig.resamples={self.resamples!r}; expected an int >= 100")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"BootstrapConfig.confidence={self.confidence!r}; expected a value in (0, 1)")
        if not isinstance(self.seed, int):
            raise ValueError(f"BootstrapConfig.seed={self.seed!r}; expected an int")


@dataclass(frozen=True)
class Interval:
    """A mean over ``num_prompts`` prompts and its bootstrap interval ``[low, high]`` (NaN: no prompt)."""

    mean: float
    low: float
    high: float
    num_prompts: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready: NaN (no prompt) becomes ``None``."""
        def finite(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {"mean": finite(self.mean), "low": finite(self.low), "high": finite(self.high),
                "num_prompts": self.num_prompts}


def as_array(values: Sequence[float | None]) -> np.ndarray:
    """``[n]`` float64 with ``None`` as NaN."""
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def bootstrap_mean(values: Sequence[float | None], cfg: BootstrapConfig = BootstrapConfig()) -> Interval:
    """Mean of the defined per-prompt ``values`` and its percentile bootstrap interval."""
    data = as_array(values)
    data = data[np.isfinite(data)]
    n = len(data)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(cfg.seed)
    means = np.empty(cfg.resamples)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, cfg.resamples, block):
        stop = min(start + block, cfg.resamples)
        means[start:stop] = data[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - cfg.confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(data.mean()), float(low), float(high), n)


def paired_difference(values: Sequence[float | None], baseline: Sequence[float | None],
                      cfg: BootstrapConfig = BootstrapConfig()) -> Interval:
    """Mean of ``values[i] - baseline[i]`` over the prompts where both are defined, with the
    paired percentile bootstrap interval (prompts resampled jointly)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired_difference: {len(values)} values but {len(baseline)} baseline values; "
                         "expected one of each per prompt")
    return bootstrap_mean(as_array(values) - as_array(baseline), cfg)
