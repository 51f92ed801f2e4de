"""kvsweep: how much quality LLMs lose when their KV cache is compressed.

Layers, each importing only those before it (tests/test_layers.py holds the rule):

    core      errors, files, thresholds, settings, timing, provenance      (no torch)
    study     the config and its schema, shards, the methods and tasks declared  (no torch)
    kernels   every Triton kernel: each module's `supports(...)` and its op (no transformers)
    engine    eviction state, scorers, the press, attention, passes and graphs, placement,
              model integration, stream_nll, generate
    analysis  results read back, bootstrap statistics, calibration search, comparison, figures
    surrogate, tasks, demo   KVzap surrogate training, the tasks' work, the CPU demo's assets
    stages    one module per workflow stage, each a function of an options object
    cli       `kvsweep <stage>` (and `python -m kvsweep <stage>`)

The Snakemake workflow imports `core` and `study` only.
"""

__version__ = "0.1.0"
