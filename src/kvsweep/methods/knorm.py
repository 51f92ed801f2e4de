import math

from kvsweep.methods import Method, sinks, sliding_window


def build_knorm(threshold: float, sliding_window: int, sinks: int):
    from kvpress import KnormPress

    from kvsweep.presses import StreamingThresholdPress

    # kvpress's score, -||k_j|| of the cached (rotated) key, taken when the token enters the cache.
    return StreamingThresholdPress(KnormPress(), threshold=threshold, sliding_window_size=sliding_window, sinks=sinks)


KNORM = Method(
    name="knorm",
    description="Key norm (Devoto et al. 2024, kvpress KnormPress): score minus the key norm, on entry",
    builder="kvsweep.methods.knorm:build_knorm",
    settings=(sliding_window(128), sinks(0)),
    window_setting="sliding_window",
    swept_meaning="minus the key norm",
    threshold_range=(-math.inf, 0.0),
)
