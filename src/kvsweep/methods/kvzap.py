from kvsweep.methods import Method
from kvsweep.presses import KVzapSurrogatePress, StreamingThresholdPress


def build_kvzap(
    threshold: float, sliding_window: int, sinks: int, kvzap_surrogate: str | None, kvzap_type: str
) -> StreamingThresholdPress:
    scorer = KVzapSurrogatePress(model_type=kvzap_type, surrogate=kvzap_surrogate)
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=sliding_window, sinks=sinks)


def _settings(sinks: int) -> dict:
    return {"sliding_window": 128, "sinks": sinks, "kvzap_surrogate": None, "kvzap_type": "mlp"}


KVZAP = Method(
    name="kvzap",
    description="KVzap surrogate scores, 4 sink tokens protected",
    build=build_kvzap,
    settings=_settings(sinks=4),
    window_setting="sliding_window",
    choices={"kvzap_type": ("mlp", "linear")},
)
KVZAP_NO_SINK = Method(
    name="kvzap_no_sink",
    description="KVzap surrogate scores, no sink tokens",
    build=build_kvzap,
    settings=_settings(sinks=0),
    window_setting="sliding_window",
    choices={"kvzap_type": ("mlp", "linear")},
)
