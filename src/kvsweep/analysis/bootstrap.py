"""Paired percentile bootstrap intervals over documents (scipy.stats.bootstrap): every quality
difference kvsweep reports pairs a configuration's documents with the baseline's same documents."""

import math

import numpy as np
from scipy import stats


def bootstrap_interval(
    samples: tuple, statistic, n_resamples: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    """The statistic over documents and its paired percentile bootstrap interval (NaN for < 2 documents)."""
    value = float(statistic(*samples))
    if len(samples[0]) < 2:
        return value, math.nan, math.nan
    result = stats.bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return value, float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_delta(nll: np.ndarray, base: np.ndarray, count: np.ndarray, n_resamples: int, confidence: float, seed: int):
    """Mean per-token NLL difference to the baseline over the same documents, with a bootstrap CI."""

    def statistic(a, b, n, axis=-1):
        return (a.sum(axis=axis) - b.sum(axis=axis)) / n.sum(axis=axis)

    return bootstrap_interval((nll, base, count), statistic, n_resamples, confidence, seed)


def paired_mean_difference(values: np.ndarray, base: np.ndarray, n_resamples: int, confidence: float, seed: int):
    """Mean per-document difference to the baseline, with a bootstrap CI."""

    def statistic(a, b, axis=-1):
        return (a - b).mean(axis=axis)

    return bootstrap_interval((values, base), statistic, n_resamples, confidence, seed)
