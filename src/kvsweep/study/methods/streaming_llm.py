from kvsweep.study.methods import Method, sinks, sliding_window

STREAMING_LLM = Method(
    name="streaming_llm",
    description=(
        "StreamingLLM (Xiao et al. 2023): sinks plus a window of recent tokens, everything else evicted; at a "
        "compression ratio, the sinks and the most recent positions the budget allows (kvpress StreamingLLMPress)"
    ),
    settings=(sliding_window(128), sinks(4)),
    sweep="sliding_window",
    window_setting="sliding_window",
    swept_meaning="window size (density rises with it)",
    density_falls=False,
    ranks_at_ratio=True,
    adaptive_budget=False,
)
