from kvsweep.core.settings import Setting
from kvsweep.study.methods import Method, sinks, sliding_window


def default_surrogate(model_name: str, model_type: str) -> str:
    """The surrogate kvpress derives from the model's name: nvidia/KVzap-{type}-{basename}."""
    return f"nvidia/KVzap-{model_type}-{str(model_name).rstrip('/').split('/')[-1]}"


KVZAP = Method(
    name="kvzap",
    description="KVzap (arXiv 2601.07891): a per-layer surrogate's log-scale importance score, on entry",
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
