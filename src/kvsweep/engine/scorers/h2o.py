"""H2O: heavy hitters by the attention they have received."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from kvpress.presses.scorer_press import ScorerPress
from torch import nn

from kvsweep.engine.scorers.base import StreamingScorer, own_method


@dataclass
class H2OScorer(StreamingScorer, ScorerPress):
    """Heavy-Hitter Oracle score (Zhang et al., 2023, https://arxiv.org/abs/2306.14048).

    The score of key j is the mean attention it has received so far: A_j / N_j, where A_j sums,
    over every forward pass, the attention probability the pass's queries put on j (averaged over
    the query heads of the KV group, over the keys the queries could actually see), and N_j is the
    number of queries that have attended to j (positions i >= j processed so far).

    Unlike kvpress's `ObservedAttentionPress`, this needs no eager attention and no n x n matrix:
    `StreamingThresholdPress` accumulates A_j inside the masked attention, pass by pass, and asks
    this scorer for a score only when a position leaves the protected window.
    """

    # Scored when decided, from the accumulated attention, not once when the token enters the cache.
    scores_on_entry: ClassVar[bool] = False
    accumulates_attention: ClassVar[bool] = True

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        """`attentions`: attention received by the keys to score, (batch, kv_heads, n), summed over
        queries; `kwargs["n_queries"]`: how many queries attended to each, (batch, n)."""
        return attentions / kwargs["n_queries"].clamp(min=1)[:, None, :]

    def decides_in_kernel(self) -> bool:
        """The decision kernel computes A_j / N_j as `score` does (`kvsweep.kernels.decisions`),
        unless `score` was changed (a subclass's, or one set on the instance, is asked)."""
        return own_method(self, "score", H2OScorer)
