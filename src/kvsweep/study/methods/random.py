from kvsweep.core.settings import Setting
from kvsweep.study.methods import Method, sinks, sliding_window

RANDOM = Method(
    name="random",
    description="Random eviction: a uniform score from a hash of (seed, document, layer, KV head, position)",
    settings=(
        sliding_window(128),
        sinks(4),
        Setting("seed", 42, "seed of the random scores (32 bits)", maximum=2**32 - 1),
    ),
    window_setting="sliding_window",
    swept_meaning="eviction probability (0: baseline, 1: streaming_llm)",
    threshold_range=(0.0, 1.0),
)
