"""SnapKV in kvpress's protocol: kvpress's own score, per document of a batch."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from kvpress.presses.snapkv_press import SnapKVPress
from torch import nn

from kvsweep.core.errors import KvsweepError
from kvsweep.engine.scorers.base import StreamingScorer


@dataclass
class SnapKVScorer(StreamingScorer, SnapKVPress):
    """kvpress's `SnapKVPress` score (Li et al. 2024, https://arxiv.org/abs/2404.14469): the
    attention the context's last `window_size` queries pay to each earlier key, averaged over those
    queries, pooled over `kernel_size` positions and averaged over the query heads of the KV
    group; the window's own keys score above every other. It exists on the pass that holds the
    whole context only (kvpress's protocol with a fixed ratio, `StreamingThresholdPress.fixed_ratio`,
    which decides once): each document of the batch is scored by kvpress's `score` on its own
    context, as kvpress's pipeline scores a batch of one."""

    scores_on_entry: ClassVar[bool] = False

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        lo, hi = kwargs["slot_range"]
        position, tokens = kwargs["position"], kwargs["tokens"]
        cos, sin = kwargs["position_embeddings"]
        scores = torch.zeros(keys.shape[0], keys.shape[1], hi - lo, dtype=torch.float32, device=keys.device)
        for b, n in enumerate(tokens.tolist()):
            if n <= self.window_size:
                raise KvsweepError(
                    f"snapkv: a context of {n} tokens is not longer than window_size {self.window_size} (its "
                    "last window_size queries score the keys before them)"
                )
            # The context's pass: its tokens lie in slots [0, n), each at its position.
            alone = {"position_embeddings": (cos[b : b + 1, :n], sin[b : b + 1, :n])}
            full = super().score(module, hidden_states[b : b + 1, :n], keys[b : b + 1, :, :n], None, None, alone)
            at = position[b].clamp(0, n - 1)
            scores[b] = torch.where(position[b] < n, full[0][:, at].float(), 0.0)
        return scores
