from kvsweep.methods import Method, Setting, sinks, sliding_window


def build_kvzap(threshold: float, sliding_window: int, sinks: int, kvzap_surrogate: str | None, kvzap_type: str):
    from kvsweep.presses import KVzapSurrogatePress, StreamingThresholdPress

    scorer = KVzapSurrogatePress(model_type=kvzap_type, surrogate=kvzap_surrogate)
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=sliding_window, sinks=sinks)


KVZAP = Method(
    name="kvzap",
    description="KVzap (arXiv 2601.07891): a per-layer surrogate's log-scale importance score, on entry",
    builder="kvsweep.methods.kvzap:build_kvzap",
    settings=(
        sliding_window(128),
        sinks(4),
        Setting(
            "kvzap_surrogate",
            None,
            "hub id or folder of the surrogate (null: nvidia/KVzap-<type>-<model>)",
            kind=str,
            model_level=True,
        ),
        Setting("kvzap_type", "mlp", "surrogate type", kind=str, choices=("mlp", "linear"), model_level=True),
    ),
    window_setting="sliding_window",
    swept_meaning="surrogate score (log scale)",
)

KVZAP_NO_SINK = KVZAP.variant("kvzap_no_sink", "KVzap with no sink tokens", sinks=0)
