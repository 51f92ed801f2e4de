"""Scorers that score a token once, when it enters the cache, from its position alone or its key:
StreamingLLM (its position: everything outside the sinks and the window goes), random eviction, and
the key norm (kvpress's `KnormPress`)."""

from dataclasses import dataclass

import torch
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.scorer_press import ScorerPress
from torch import nn

from kvsweep.engine.random_scores import random_uniform
from kvsweep.engine.scorers.base import StreamingScorer


@dataclass
class StreamingLLMScorer(StreamingScorer, ScorerPress):
    """StreamingLLM (Xiao et al., 2023, https://arxiv.org/abs/2309.17453): attention sinks plus a
    window of recent tokens, nothing else. A position scores its own index and the press's
    threshold is +inf, so each position is evicted when it leaves the window; the sinks are never
    evicted. The density is set by the window (and the sinks), not by a threshold. At a fixed ratio
    (kvpress's protocol) the order is recency: the top of it is the most recent positions, which
    with the sinks is what kvpress's `StreamingLLMPress` keeps."""

    reads_cache = False

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        layout = kwargs["layout"]
        positions = layout.position.index_select(1, layout.query_slots).float()
        return positions[:, None, :].expand(-1, module.config.num_key_value_heads, -1)


@dataclass
class RandomScorer(StreamingScorer, ScorerPress):
    """Random eviction: the score of position j is uniform in [0, 1), a counter-based hash of
    (seed, document, layer, KV head, j) (`kvsweep.engine.random_scores.random_uniform`; the document is named
    by a hash of its tokens). A threshold t evicts each decided position with probability t, and a
    document's decisions are the same at any chunk size, batch size or batch composition."""

    seed: int = 42

    def allocate(self, module: nn.Module, layout) -> torch.Tensor:
        """The layer's scores of every position a slot of the batch can hold, computed once per
        batch (a few dozen integer operations per position, not repeated on every pass)."""
        batch, capacity = layout.position.shape
        device = layout.position.device
        heads = torch.arange(module.config.num_key_value_heads, device=device)
        positions = torch.arange(capacity, device=device).expand(batch, capacity)
        return random_uniform(self.seed, layout.document_keys, module.layer_idx, heads, positions)

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        table = kwargs["scorer_state"]  # (batch, kv_heads, capacity): by position
        layout = kwargs["layout"]
        positions = layout.position.index_select(1, layout.query_slots).clamp(min=0)
        positions = positions[:, None, :].expand(-1, table.shape[1], -1)
        return table.gather(2, positions)


@dataclass
class KnormScorer(StreamingScorer, KnormPress):
    """Key norm (Devoto et al., 2024, https://arxiv.org/abs/2406.11430; kvpress's `KnormPress`):
    minus the norm of the cached (rotated) key, taken when the token enters the cache."""
