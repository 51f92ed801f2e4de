"""One module per stage of the workflow (prepare, evaluate, calibrate, score, comparison, figures,
eviction_map, train_surrogate, demo_assets): each runs from an options object, with no argparse
(`kvsweep.cli` builds the options from a command line)."""
