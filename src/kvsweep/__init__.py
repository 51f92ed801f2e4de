"""kvsweep: how much quality LLMs lose when their KV cache is compressed.

The package holds the streaming-evaluation engine (threshold eviction on top of kvpress presses,
applied as a real attention mask) and the small scripts the Snakemake workflow calls.
"""

__version__ = "0.1.0"
