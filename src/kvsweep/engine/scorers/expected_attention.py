"""Expected Attention, streamed: the attention future queries are expected to pay to each key."""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.utils import get_prerope_query_states
from torch import nn

from kvsweep.engine.placement import module_device, rotary_copy
from kvsweep.engine.scorers.base import StreamingScorer
from kvsweep.kernels import expected_logits


@dataclass
class ExpectedAttentionScorer(StreamingScorer, ExpectedAttentionPress):
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
    outliers would dominate), merged pass by pass into a running mean and covariance per query
    head. They are therefore defined at any chunk size, chunk 1 included (one query per pass). A
    key is scored when it is decided, after the pass in which it leaves the window, with the
    statistics and the visible keys of that moment. Before any query has been counted the
    statistics are zero and every visible key gets the same expected attention.
    """

    scores_on_entry: ClassVar[bool] = False
    observes_queries: ClassVar[bool] = True
    # Per (rotary embedding, device): the rotary embedding the layers there use and the first of them,
    # and the pass's rotation, which that layer computes for the others.
    _rotaries: dict = field(default_factory=dict, init=False, repr=False)
    _rotations: dict = field(default_factory=dict, init=False, repr=False)

    def allocate(self, module: nn.Module, layout) -> dict[str, torch.Tensor]:
        """Running statistics of the layer's pre-RoPE queries, per document and query head: count,
        mean, and the sum of squared deviations from the mean (the covariance times the count)."""
        heads, dim = module.config.num_attention_heads, module.head_dim
        batch, device = layout.position.shape[0], layout.position.device
        self._place_rotary(module, device)
        return {
            "count": torch.zeros(batch, device=device),
            "mean": torch.zeros(batch, heads, dim, device=device),
            "spread": torch.zeros(batch, heads, dim, dim, device=device) if self.use_covariance else None,
        }

    def _place_rotary(self, module: nn.Module, device: torch.device) -> None:
        """Note the rotary embedding the layers on `device` rotate with, and the first of them. A
        split model's layers on another GPU than the embedding get a copy of it there: calling the
        first GPU's module from the middle of a layer would be work on another GPU, which the CUDA
        graph captured for this layer's GPU would not hold. (kvpress gives every attention module
        the model's `rotary_emb` while the press is active.)"""
        if getattr(module, "rotary_emb", None) is None:
            return
        key = (id(module.rotary_emb), device)
        rotary, first = self._rotaries.get(key, (None, module.layer_idx))
        if rotary is None:
            same = module_device(module.rotary_emb) == device
            rotary = module.rotary_emb if same else rotary_copy(module.rotary_emb, device)
        self._rotaries[key] = (rotary, min(first, module.layer_idx))

    def observe(self, module: nn.Module, hidden_states: torch.Tensor, stats: dict, counted: torch.Tensor) -> None:
        """Merge the pass's queries into the statistics; `counted` (batch, q) is 1 for a query that
        counts. Centred per pass and merged (Chan et al.'s pairwise update), so a query dimension
        with a large mean and a small spread keeps its variance in float32 at any chunk size (the
        raw sums of q and q q' would cancel)."""
        queries = get_prerope_query_states(module, hidden_states).float()
        weight = counted[:, None, :, None]
        before, added = stats["count"], counted.sum(1)
        total = before + added
        pass_mean = (queries * weight).sum(2) / added.clamp(min=1)[:, None, None]
        shift = pass_mean - stats["mean"]  # (batch, heads, d)
        share = (added / total.clamp(min=1))[:, None, None]
        if stats["spread"] is not None:
            centred = (queries - pass_mean[:, :, None, :]) * weight
            merged = (before * share[:, 0, 0])[:, None, None, None] * shift[..., :, None] * shift[..., None, :]
            stats["spread"] += centred.transpose(2, 3) @ centred + merged
        stats["mean"] += shift * share
        stats["count"].copy_(total)

    def average_rope(self, rotary: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, d, d): RoPE's rotation (the model's `rotary` embedding) averaged over positions
        [tokens, tokens + n_future)."""
        future = tokens[:, None] + torch.arange(self.n_future_positions, device=tokens.device)
        probe = torch.zeros(1, device=tokens.device, dtype=torch.float32)
        cos, sin = rotary(probe, future)  # (batch, n_future, d)
        cos, sin = cos.float().mean(1), sin.float().mean(1)
        d = cos.shape[-1]
        eye = torch.eye(d, device=cos.device)
        half = torch.zeros(d, d, device=cos.device)  # rotate_half as a matrix: x -> P x
        half[d // 2 :, : d // 2], half[: d // 2, d // 2 :] = eye[: d // 2, : d // 2], -eye[: d // 2, : d // 2]
        return cos[:, None, :] * eye + sin[:, None, :] * half

    def rotation(self, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """`average_rope`, computed by the first layer of each pass on each device and reused by the
        others there (they share the model's rotary embedding and the documents' lengths)."""
        key = (id(module.rotary_emb), tokens.device)
        rotary, first = self._rotaries[key]
        if module.layer_idx == first or key not in self._rotations:
            self._rotations[key] = self.average_rope(rotary, tokens)
        return self._rotations[key]

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """`keys`, `values`: the cache over slots [0, hi); returns the scores of slots [lo, hi)
        (`kwargs["slot_range"]`). `kwargs["visible"]` (batch, KV heads, hi) marks the keys the
        softmax runs over; `kwargs["scorer_state"]` holds the running query statistics;
        `kwargs["tokens"]` each document's tokens so far."""
        stats, visible, (lo, hi) = kwargs["scorer_state"], kwargs["visible"], kwargs["slot_range"]
        batch, kv_heads, n, d = keys.shape
        group = stats["mean"].shape[1] // kv_heads
        count = stats["count"].clamp(min=1)[:, None, None]
        rotation = self.rotation(module, kwargs["tokens"])[:, None]  # (batch, 1, d, d)
        mean = (rotation @ stats["mean"][..., None]).squeeze(-1) / math.sqrt(d)  # (batch, heads, d)
        covariance = None
        if stats["spread"] is not None:
            # Rotated in the keys' precision, the precision the logits multiply it in (float32
            # d x d products per head and pass cost a 16-bit model more than the rest of the score).
            work = keys.dtype if keys.dtype in (torch.bfloat16, torch.float16) else torch.float32
            turn = rotation.to(work)
            covariance = (turn @ (stats["spread"] / count[..., None]).to(work) @ turn.transpose(-1, -2)).float()
            covariance = covariance / (2 * d)  # (batch, heads, d, d)
        if expected_logits.supports(keys):
            logits = expected_logits.expected_logits(
                keys,
                mean.view(batch, kv_heads, group, d),
                None if covariance is None else covariance.view(batch, kv_heads, group, d, d),
            )
        else:
            logits = expected_logits_torch(keys, mean, covariance)
        logits = logits.view(batch, kv_heads, n, group).masked_fill(~visible[..., None], float("-inf"))
        probs = torch.softmax(logits, dim=2).mean(-1)[:, :, lo:hi]
        if self.use_vnorm:
            probs = (probs + self.epsilon) * values[:, :, lo:hi].float().norm(dim=-1)
        return probs


def expected_logits_torch(keys: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor | None) -> torch.Tensor:
    """What `kvsweep.kernels.expected_logits` computes, with torch ops (no Triton): (batch,
    kv_heads, n, group) float32. mean (batch, heads, d); covariance (batch, heads, d, d) or None.
    Products over every key run in the cache's precision when it is 16-bit (as kvpress's score
    does); K S is written whole (group x the size of the keys)."""
    batch, kv_heads, n, d = keys.shape
    group = mean.shape[1] // kv_heads
    work = keys.dtype if keys.dtype in (torch.bfloat16, torch.float16) else torch.float32

    def per_group(matrix: torch.Tensor) -> torch.Tensor:
        """(batch, heads, d, w) -> (batch * kv_heads, d, group * w): one matrix per KV group."""
        w = matrix.shape[-1]
        grouped = matrix.reshape(batch, kv_heads, group, d, w).permute(0, 1, 3, 2, 4)
        return grouped.reshape(batch * kv_heads, d, group * w).to(work)

    flat = keys.reshape(batch * kv_heads, n, d).to(work)
    logits = flat @ per_group(mean[..., None])  # (batch * kv_heads, n, group)
    if covariance is not None:
        spread = (flat @ per_group(covariance)).view(batch * kv_heads, n, group, d)
        logits = logits + (spread @ flat[..., None]).squeeze(-1)
    return logits.float().view(batch, kv_heads, n, group)
