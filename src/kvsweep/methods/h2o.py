from kvsweep.methods import Method
from kvsweep.presses import H2OScorer, StreamingThresholdPress


def build_h2o(threshold: float, local_window: int, sinks: int) -> StreamingThresholdPress:
    return StreamingThresholdPress(H2OScorer(), threshold=threshold, sliding_window_size=local_window, sinks=sinks)


H2O = Method(
    name="h2o",
    description="H2O: evict keys whose mean received attention is below the threshold",
    build=build_h2o,
    settings={"local_window": 512, "sinks": 0},
    window_setting="local_window",
)
