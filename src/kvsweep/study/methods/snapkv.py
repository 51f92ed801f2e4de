from kvsweep.core.settings import Setting
from kvsweep.study.methods import Method

SNAPKV = Method(
    name="snapkv",
    description=(
        "SnapKV (Li et al. 2024, kvpress SnapKVPress): the attention of the context's last window_size queries, "
        "pooled over kernel_size positions; those queries' own keys are kept. kvpress's protocol, compression "
        "ratios only"
    ),
    settings=(
        Setting("window_size", 64, "the context's last tokens whose queries score the keys before them", minimum=1),
        Setting("kernel_size", 5, "width of the average pooling of the scores", choices=(1, 3, 5, 7, 9, 11, 13, 15)),
    ),
    swept_meaning="kvpress's compression ratio",
    ratio_only=True,
)
