from kvsweep.methods import Method
from kvsweep.presses import KVzapSurrogatePress, StreamingThresholdPress


def build_kvzap(
    threshold: float, sliding_window: int, sinks: int, kvzap_surrogate: str | None, kvzap_type: str
) -> StreamingThresholdPress:
    scorer = KVzapSurrogatePress(model_type=kvzap_type, surrogate=kvzap_surrogate)
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=sliding_window, sinks=sinks)


def kvzap_method(name: str, sinks: int, description: str) -> Method:
    """KVzap variants differ only in how many sink tokens they protect by default."""
    return Method(
        name=name,
        description=description,
        build=build_kvzap,
        settings={"sliding_window": 128, "sinks": sinks, "kvzap_surrogate": None, "kvzap_type": "mlp"},
        window_setting="sliding_window",
        choices={"kvzap_type": ("mlp", "linear")},
    )


KVZAP = kvzap_method("kvzap", sinks=4, description="KVzap surrogate scores, 4 sink tokens protected")
KVZAP_NO_SINK = kvzap_method("kvzap_no_sink", sinks=0, description="KVzap surrogate scores, no sink tokens")
