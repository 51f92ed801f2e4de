"""The streaming engine: per-layer eviction state, the scorers of each method, the press that
decides (kvpress's `DMSPress` extended), eviction as a real attention mask, fixed-shape passes
replayed as CUDA graphs, placement over GPUs, the fusions that run kvsweep's kernels inside a
transformers model (`integration`), and the two things a job does with a model: `stream_nll` and
`stream_generate`."""

from kvsweep.engine.upstream import without_package_init

without_package_init()
