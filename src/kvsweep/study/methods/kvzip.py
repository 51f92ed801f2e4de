from kvsweep.core.settings import Setting
from kvsweep.study.methods import Method, sinks

KVZIP = Method(
    name="kvzip",
    description=(
        "KVzip (Kim et al. 2025, kvpress KVzipPress), KVzip+ normalised (KVzap, arXiv 2601.07891): the attention each "
        "entry gets while the model repeats its context, the oracle KVzap imitates; one budget over every layer and "
        "head. kvpress's protocol, compression ratios only"
    ),
    settings=(
        sinks(4),
        Setting(
            "layerwise", False, "every layer evicts the ratio (false: the layers and heads share one budget)", kind=bool
        ),
        Setting("kvzip_plus", True, "KVzip+'s normalisation: attention / ||hidden state|| x ||W_o v||", kind=bool),
        Setting("repeat_chunk", 2048, "context tokens repeated per reconstruction pass", minimum=1),
    ),
    swept_meaning="kvpress's compression ratio",
    ratio_only=True,
    adaptive_budget=False,
)
