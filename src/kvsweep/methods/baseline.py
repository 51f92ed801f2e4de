from kvsweep.methods import Method

BASELINE = Method(
    name="baseline",
    description="no compression: every key stays in the cache",
    build=lambda threshold=None: None,
    takes_threshold=False,
)
