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
