from kvsweep.core.settings import Setting
from kvsweep.study.methods import Method, sinks

H2O = Method(
    name="h2o",
    description="H2O (Zhang et al. 2023): evict keys whose mean received attention is below the threshold",
    settings=(Setting("local_window", 512, "most recent tokens, not yet decided (H2O's local window)"), sinks(0)),
    window_setting="local_window",
    swept_meaning="mean attention received",
    threshold_range=(0.0, 1.0),
)

# "observed attention", a reference point of the study: H2O's score with the DMS window instead of H2O's.
OBSERVED_ATTENTION = H2O.variant(
    "observed_attention", "H2O's score (mean attention received) with a 128-token window", local_window=128
)
