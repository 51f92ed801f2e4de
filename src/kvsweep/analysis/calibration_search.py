"""The calibration's search: the threshold at which a method keeps a target share of the
compressible KV cache, given the density a threshold gives (`measure`) and the probe's score
quantiles.

The search maps the quantile level p to a threshold (p = 1 - target would be exact if eviction did
not change later scores; it does) and searches p, deterministically: secant steps from the
probe's guess until the target is bracketed, then regula falsi on the logit of the density
(Illinois) with bisection as a fallback. Every threshold tried is rounded to 4 significant digits
(more where the scores' spread is small next to their size), so that a recalibration that lands
on the same value names the same evaluation path, and lies within the method's threshold range.
A target that cannot be reached within the tolerance (the density jumps over it, or even the
largest threshold keeps more) stops with the closest threshold found and its density.
"""

import math
from dataclasses import dataclass

import numpy as np

from kvsweep.core.errors import KvsweepError
from kvsweep.core.thresholds import canonical_threshold

QUANTILE_LEVELS = 1001  # probe quantiles at p = 0, 0.001, ..., 1
SIGNIFICANT_DIGITS = 4


def rounded(threshold: float, spread: float = 0.0) -> float:
    """`threshold` to 4 significant digits, or finer where the scores' spread is small next to their
    size (KVzap-like scores of -12 +- 0.01 need more than 4 digits to be told apart): at least 5
    digits below the spread's leading one."""
    digits = SIGNIFICANT_DIGITS
    if threshold and spread > 0:
        digits = max(digits, math.floor(math.log10(abs(threshold))) - math.floor(math.log10(spread)) + 5)
    return float(f"{threshold:.{digits}g}")


def threshold_at(quantiles: np.ndarray, level: float) -> float:
    """The threshold of quantile level p in [0, 2]: the probe's score quantile for p <= 1, and
    beyond the largest score a linear continuation (p = 2 lies one score range above it), for
    methods whose scores rise once others are evicted (H2O's attention is renormalized)."""
    if level <= 1.0:
        return float(np.interp(level, np.linspace(0.0, 1.0, len(quantiles)), quantiles))
    span = max(float(quantiles[-1] - quantiles[0]), abs(float(quantiles[-1])), 1e-12)
    return float(quantiles[-1]) + (level - 1.0) * span


@dataclass
class Step:
    level: float
    threshold: float
    density: float


def _logit(density: float) -> float:
    density = min(max(density, 1e-6), 1 - 1e-6)
    return math.log(density / (1 - density))


def search(
    measure, quantiles: np.ndarray, target: float, tolerance: float, max_steps: int, log=print,
    limits: tuple[float, float] = (-math.inf, math.inf),
):  # fmt: skip
    """Find a threshold whose density is within `tolerance` of `target`. `measure(threshold)`
    returns the density; it is assumed to fall (weakly) as the threshold rises. Every threshold
    tried lies within `limits` (the method's `threshold_range`). Returns (the step that reached the
    target, every step); raises KvsweepError naming the closest otherwise.

    Until the target is bracketed: secant steps in quantile level (the first with slope 1, which
    corrects a constant offset between the probe and the real density exactly). Once bracketed:
    regula falsi on the logit of the density (the Illinois variant, which halves the weight of an
    end kept twice), and bisection when that would not shrink the bracket."""
    steps: list[Step] = []
    seen: dict[float, float] = {}
    low: Step | None = None  # a step with density above the target
    high: Step | None = None  # a step with density below it
    kept_side, weight = None, 1.0
    level = min(max(1.0 - target, 0.0), 1.0)
    why = f"no threshold within {max_steps} steps"
    spread = float(quantiles[-1] - quantiles[0])
    for index in range(max_steps):
        threshold = min(max(rounded(threshold_at(quantiles, level), spread), limits[0]), limits[1])
        # A bracket narrower than a tenth of the probe's quantile spacing (in level, so that it is
        # relative to how the scores are distributed, not to their range), with the target still
        # outside: the density jumps over it (many positions share a score).
        narrow = low is not None and high is not None and high.level - low.level < 0.1 / (len(quantiles) - 1)
        if threshold in seen and threshold in limits:
            end = "highest" if threshold == limits[1] else "lowest"
            why = f"the search reached the {end} threshold of the method's range ({canonical_threshold(threshold)})"
            break
        if threshold in seen or narrow:
            why = "the density jumps over the target between neighbouring thresholds"
            break
        density = seen[threshold] = measure(threshold)
        step = Step(level, threshold, density)
        steps.append(step)
        log(
            f"step {index + 1}: threshold {canonical_threshold(threshold)} -> compressible density {density:.4f} "
            f"(target {target} +- {tolerance})"
        )
        if abs(density - target) <= tolerance:
            return step, steps
        side = "low" if density > target else "high"
        if side == "low":
            low = step if low is None or step.level > low.level else low
        else:
            high = step if high is None or step.level < high.level else high
        if low is None or high is None:
            if side == "low" and level >= 2.0:
                why = "even a threshold above every score keeps more"
                break
            if side == "high" and level <= 0.0:
                why = "even a threshold below every score evicts more"
                break
            slope = 1.0
            if len(steps) > 1 and steps[-2].level != level:
                slope = (steps[-2].density - density) / (level - steps[-2].level)
                slope = min(max(slope, 0.2), 5.0)
            level = min(max(level + (density - target) / slope, 0.0), 2.0)
            continue
        weight = weight / 2 if kept_side == ("high" if side == "low" else "low") else 1.0
        kept_side = "high" if side == "low" else "low"
        f_low, f_high = _logit(low.density) - _logit(target), _logit(high.density) - _logit(target)
        if kept_side == "high":
            f_high *= weight
        else:
            f_low *= weight
        level = low.level + f_low * (high.level - low.level) / (f_low - f_high)
        margin = 0.05 * (high.level - low.level)
        if not low.level + margin < level < high.level - margin:
            level = (low.level + high.level) / 2
    if low is not None and high is not None:
        why += (
            f" (it falls from {low.density:.4f} at {canonical_threshold(low.threshold)} to {high.density:.4f} at "
            f"{canonical_threshold(high.threshold)})"
        )
    closest = min(steps, key=lambda s: abs(s.density - target))
    seen_text = ", ".join(f"{canonical_threshold(s.threshold)} -> {s.density:.4f}" for s in steps)
    raise KvsweepError(
        f"target density {target} cannot be reached within {tolerance}: {why}. Closest: threshold "
        f"{canonical_threshold(closest.threshold)} with density {closest.density:.4f} (tried: {seen_text}). "
        "Remove the target, or widen calibration.tolerance"
    )
