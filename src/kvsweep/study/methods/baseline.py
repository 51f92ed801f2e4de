from kvsweep.study.methods import Method

BASELINE = Method(
    name="baseline",
    description="No compression: every key stays in the cache",
    sweep=None,
)
