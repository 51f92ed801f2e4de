import math

from kvsweep.methods import Method, Setting, sinks, sliding_window


def build_expected_attention(
    threshold: float, sliding_window: int, sinks: int, n_future_positions: int, use_covariance: bool, use_vnorm: bool
):
    from kvsweep.presses import ExpectedAttentionScorer, StreamingThresholdPress

    scorer = ExpectedAttentionScorer(
        n_future_positions=n_future_positions, n_sink=sinks, use_covariance=use_covariance, use_vnorm=use_vnorm
    )
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=sliding_window, sinks=sinks)


EXPECTED_ATTENTION = Method(
    name="expected_attention",
    description=(
        "Expected Attention (Devoto et al. 2025, kvpress ExpectedAttentionPress): the attention future queries "
        "are expected to pay, from the statistics of the queries streamed so far, times the value norm; at decision time"
    ),
    builder="kvsweep.methods.expected_attention:build_expected_attention",
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
