"""Name -> method. One entry per method (a variant is a method too)."""

from kvsweep.methods.baseline import BASELINE
from kvsweep.methods.expected_attention import EXPECTED_ATTENTION
from kvsweep.methods.h2o import H2O, OBSERVED_ATTENTION
from kvsweep.methods.knorm import KNORM
from kvsweep.methods.kvzap import KVZAP, KVZAP_NO_SINK
from kvsweep.methods.random_eviction import RANDOM
from kvsweep.methods.streaming_llm import STREAMING_LLM

METHODS = {
    method.name: method
    for method in (
        BASELINE,
        KVZAP,
        KVZAP_NO_SINK,
        H2O,
        OBSERVED_ATTENTION,
        STREAMING_LLM,
        RANDOM,
        EXPECTED_ATTENTION,
        KNORM,
    )
}
