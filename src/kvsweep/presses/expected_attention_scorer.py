"""Expected Attention, streamed: the attention future queries are expected to pay to each key."""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from kvpress import ExpectedAttentionPress
from kvpress.utils import get_prerope_query_states
from torch import nn


@dataclass
class ExpectedAttentionScorer(ExpectedAttentionPress):
    """kvpress's `ExpectedAttentionPress` score (Devoto et al., 2025, https://arxiv.org/abs/2510.00636)
    for threshold eviction while a document streams.

    The score of key j: the softmax, over the document's visible keys outside the sinks, of the
    expected logit of a future query, E[q.k_j / sqrt(d)] + 1/2 k_j' Cov(q) k_j / d (with
    `use_covariance`), averaged over the query heads of j's KV group, times ||v_j|| (with
    `use_vnorm`). The query's mean and covariance are those of the pre-RoPE queries, each rotated
    by the RoPE matrix averaged over the next `n_future_positions` positions of the document.

    Where the statistics come from (kvpress computes them from the queries of one prefill, which a
    stream does not have): the queries of every position the document has streamed so far, except
    the first `n_sink` (set to the method's sinks; kvpress too leaves out the first queries, whose
    outliers would dominate), accumulated pass by pass as running sums of q and q q' per query
    head. They are therefore defined at any chunk size, chunk 1 included (one query per pass). A
    key is scored when it is decided, after the pass in which it leaves the window, with the
    statistics and the visible keys of that moment. Before any query has been counted the
    statistics are zero and every visible key gets the same expected attention.
    """

    scores_on_entry: ClassVar[bool] = False
    accumulates_attention: ClassVar[bool] = False
    observes_queries: ClassVar[bool] = True

    def allocate(self, module: nn.Module, layout) -> dict[str, torch.Tensor]:
        """Running sums of the layer's pre-RoPE queries, per document and query head."""
        heads, dim = module.config.num_attention_heads, module.head_dim
        batch, device = layout.position.shape[0], layout.position.device
        return {
            "count": torch.zeros(batch, device=device),
            "sum": torch.zeros(batch, heads, dim, device=device),
            "outer": torch.zeros(batch, heads, dim, dim, device=device) if self.use_covariance else None,
        }

    def observe(self, module: nn.Module, hidden_states: torch.Tensor, stats: dict, counted: torch.Tensor) -> None:
        """Add the pass's queries to the sums; `counted` (batch, q) is 1 for a query that counts."""
        queries = get_prerope_query_states(module, hidden_states).float() * counted[:, None, :, None]
        stats["count"] += counted.sum(1)
        stats["sum"] += queries.sum(2)
        if stats["outer"] is not None:
            stats["outer"] += queries.transpose(2, 3) @ queries

    def average_rope(self, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, d, d): RoPE's rotation averaged over positions [tokens, tokens + n_future)."""
        future = tokens[:, None] + torch.arange(self.n_future_positions, device=tokens.device)
        probe = torch.zeros(1, device=tokens.device, dtype=torch.float32)
        cos, sin = module.rotary_emb(probe, future)  # (batch, n_future, d)
        cos, sin = cos.float().mean(1), sin.float().mean(1)
        d = cos.shape[-1]
        eye = torch.eye(d, device=cos.device)
        half = torch.zeros(d, d, device=cos.device)  # rotate_half as a matrix: x -> P x
        half[d // 2 :, : d // 2], half[: d // 2, d // 2 :] = eye[: d // 2, : d // 2], -eye[: d // 2, : d // 2]
        return cos[:, None, :] * eye + sin[:, None, :] * half

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """`keys`, `values`: the cache over slots [0, hi); returns the scores of slots [lo, hi)
        (`kwargs["slot_range"]`). `kwargs["visible"]` (batch, KV heads, hi) marks the keys the
        softmax runs over; `kwargs["scorer_state"]` holds the running query sums;
        `kwargs["tokens"]` each document's tokens so far."""
        stats, visible, (lo, hi) = kwargs["scorer_state"], kwargs["visible"], kwargs["slot_range"]
        count = stats["count"].clamp(min=1)[:, None, None]
        mean = stats["sum"] / count  # (batch, heads, d)
        rotation = self.average_rope(module, kwargs["tokens"])[:, None]  # (batch, 1, d, d)
        batch, kv_heads, n, d = keys.shape
        group = mean.shape[1] // kv_heads
        # The products over every key run in the cache's precision when it is 16-bit (accumulated
        # in float32 by the matmul; the sums below in float32): in float32 they would cost the
        # GPU more than the model's own pass. Keys stay grouped: (batch, kv_heads, 1, n, d).
        work = keys.dtype if keys.dtype in (torch.bfloat16, torch.float16) else torch.float32
        grouped = keys.to(work)[:, :, None]
        mean = (rotation @ mean[..., None]).view(batch, kv_heads, group, d, 1)
        logits = (grouped @ mean.to(work)).squeeze(-1).float() / math.sqrt(d)  # (batch, kv_heads, group, n)
        if stats["outer"] is not None:
            covariance = stats["outer"] / count[..., None] - mean_outer(stats["sum"] / count)
            covariance = (rotation @ covariance @ rotation.transpose(-1, -2)).view(batch, kv_heads, group, d, d)
            logits = logits + ((grouped @ covariance.to(work)) * grouped).sum(-1, dtype=torch.float32) / d / 2
        logits = logits.masked_fill(~visible[:, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(2)[:, :, lo:hi]
        if self.use_vnorm:
            probs = (probs + self.epsilon) * values[:, :, lo:hi].float().norm(dim=-1)
        return probs


def mean_outer(mean: torch.Tensor) -> torch.Tensor:
    return mean[..., :, None] * mean[..., None, :]
