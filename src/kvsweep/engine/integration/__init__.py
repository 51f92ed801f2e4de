"""Where kvsweep's kernels enter a transformers model: a declared table of the model classes and
transformers versions each fusion is written for (`families`), the forwards mirrored from
transformers (`mirrors`), and the context that turns them on while a press is active (`fusions`)."""
