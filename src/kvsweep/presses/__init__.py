"""Presses: kvpress presses extended for streaming threshold eviction."""

from kvsweep.presses.h2o_scorer import H2OScorer
from kvsweep.presses.kvzap_surrogate import KVzapSurrogatePress
from kvsweep.presses.streaming_threshold_press import StreamingThresholdPress

__all__ = ["H2OScorer", "KVzapSurrogatePress", "StreamingThresholdPress"]
