"""One canonical spelling per threshold, so that `-5`, `-5.0` and `-5.00`, or `5e-4`, `5.0e-4` and
`0.0005`, name the same output path and an edit of the YAML reruns nothing that did not change."""

import math

from kvsweep.core.errors import KvsweepError


def check_threshold(number: float, written=None) -> float:
    """A threshold is a finite number or -inf (which evicts nothing). NaN evicts nothing either,
    silently, and +inf is what a number too large for a float (1e400) becomes: both are refused."""
    written = number if written is None else written
    if math.isnan(number):
        raise KvsweepError("threshold NaN is not allowed: no score is below NaN, so nothing would be evicted")
    if number == math.inf:
        raise KvsweepError(
            f"threshold {written!r} is +infinity (a number too large for a float overflows to it): "
            "write a finite number, or -inf to evict nothing"
        )
    return number + 0.0  # -0.0 -> 0.0


def parse_threshold(value) -> float:
    """A threshold from YAML or the command line: a number, a numeric string ('5e-4'), or -inf."""
    if isinstance(value, bool):
        raise KvsweepError(f"threshold {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise KvsweepError(f"threshold {value!r} is not a number (write e.g. -5, 0.0005, 5.0e-4 or -inf)") from None
    return check_threshold(number, value)


def canonical_threshold(value) -> str:
    """The shortest text that reads back as the same float: -5, 0.0005, 5e-05, -inf."""
    number = parse_threshold(value)
    if math.isinf(number):
        return "-inf"
    text = repr(number)
    return text.removesuffix(".0")


# A compression ratio (kvpress's budget) names its output folder `ratio_<canonical ratio>`, beside
# the thresholds' folders of the same method.
RATIO_PREFIX = "ratio_"


def ratio_folder(canonical_ratio: str) -> str:
    return f"{RATIO_PREFIX}{canonical_ratio}"


def ratio_of_folder(name: str) -> float | None:
    """The ratio a folder `ratio_<r>` names, None for any other folder; a malformed ratio is an error."""
    if not name.startswith(RATIO_PREFIX):
        return None
    try:
        ratio = float(name.removeprefix(RATIO_PREFIX))
    except ValueError:
        ratio = math.nan
    if not 0 <= ratio < 1:
        raise KvsweepError(f"'{name}' names no compression ratio (ratio_<r>, r in [0, 1))")
    return ratio
