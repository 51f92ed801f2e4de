"""Presses: kvpress presses extended for streaming threshold eviction."""

from kvsweep.presses.entry_scorers import RandomScorer, StreamingLLMScorer
from kvsweep.presses.expected_attention_scorer import ExpectedAttentionScorer
from kvsweep.presses.h2o_scorer import H2OScorer
from kvsweep.presses.kvzap_surrogate import KVzapSurrogatePress
from kvsweep.presses.streaming_threshold_press import StreamingThresholdPress

__all__ = [
    "ExpectedAttentionScorer",
    "H2OScorer",
    "KVzapSurrogatePress",
    "RandomScorer",
    "StreamingLLMScorer",
    "StreamingThresholdPress",
]
