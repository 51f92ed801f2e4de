import math

from kvsweep.study.methods import Method, sinks, sliding_window

KNORM = Method(
    name="knorm",
    description="Key norm (Devoto et al. 2024, kvpress KnormPress): score minus the key norm, on entry",
    settings=(sliding_window(128), sinks(0)),
    window_setting="sliding_window",
    swept_meaning="minus the key norm",
    threshold_range=(-math.inf, 0.0),
)
