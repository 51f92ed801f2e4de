from kvsweep.methods import Method, Setting, sinks, sliding_window


def build_random(threshold: float, sliding_window: int, sinks: int, seed: int):
    from kvsweep.presses import RandomScorer, StreamingThresholdPress

    return StreamingThresholdPress(
        RandomScorer(seed=seed), threshold=threshold, sliding_window_size=sliding_window, sinks=sinks
    )


RANDOM = Method(
    name="random",
    description="Random eviction: a uniform score from a hash of (seed, document, layer, KV head, position)",
    builder="kvsweep.methods.random_eviction:build_random",
    settings=(
        sliding_window(128),
        sinks(4),
        Setting("seed", 42, "seed of the random scores (32 bits)", maximum=2**32 - 1),
    ),
    window_setting="sliding_window",
    swept_meaning="eviction probability (0: baseline, 1: streaming_llm)",
    threshold_range=(0.0, 1.0),
)
