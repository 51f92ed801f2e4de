"""The scorers of the methods, each a kvpress press extended with the `StreamingScorer` contract
(`base`): what `StreamingThresholdPress` asks of a score, and when."""

from kvsweep.engine.scorers.base import StreamingScorer
from kvsweep.engine.scorers.entry import KnormScorer, RandomScorer, StreamingLLMScorer
from kvsweep.engine.scorers.expected_attention import ExpectedAttentionScorer
from kvsweep.engine.scorers.h2o import H2OScorer
from kvsweep.engine.scorers.kvzap import KVzapScorer
from kvsweep.engine.scorers.kvzip import KVzipScorer
from kvsweep.engine.scorers.snapkv import SnapKVScorer

__all__ = [
    "ExpectedAttentionScorer",
    "H2OScorer",
    "KVzapScorer",
    "KVzipScorer",
    "KnormScorer",
    "RandomScorer",
    "SnapKVScorer",
    "StreamingLLMScorer",
    "StreamingScorer",
]
