import math

from kvsweep.core.settings import Setting
from kvsweep.study.methods import Method, sinks, sliding_window

EXPECTED_ATTENTION = Method(
    name="expected_attention",
    description=(
        "Expected Attention (Devoto et al. 2025, kvpress ExpectedAttentionPress): the attention future queries "
        "are expected to pay, from the statistics of the queries streamed so far, times the value norm; at decision time"
    ),
    settings=(
        sliding_window(128),
        sinks(4),
        Setting("n_future_positions", 512, "future positions RoPE is averaged over", minimum=1),
        Setting("use_covariance", True, "add the queries' covariance term", kind=bool),
        Setting("use_vnorm", True, "multiply by the value norm", kind=bool),
    ),
    window_setting="sliding_window",
    swept_meaning="expected attention x value norm",
    threshold_range=(0.0, math.inf),
)
