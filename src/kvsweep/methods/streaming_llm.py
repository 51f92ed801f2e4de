from kvsweep.methods import Method, sinks, sliding_window


def build_streaming_llm(sliding_window: int, sinks: int):
    from kvsweep.presses import StreamingLLMScorer, StreamingThresholdPress

    # Every position scores 0 < +inf: each is evicted as it leaves the window (sinks excepted).
    return StreamingThresholdPress(
        StreamingLLMScorer(), threshold=float("inf"), sliding_window_size=sliding_window, sinks=sinks
    )


STREAMING_LLM = Method(
    name="streaming_llm",
    description="StreamingLLM (Xiao et al. 2023): sinks plus a window of recent tokens, everything else evicted",
    builder="kvsweep.methods.streaming_llm:build_streaming_llm",
    settings=(sliding_window(128), sinks(4)),
    sweep="sliding_window",
    window_setting="sliding_window",
    swept_meaning="window size (density rises with it)",
    density_falls=False,
)
