"""Per-layer eviction state of a batch being streamed through the model.

Every cached position j of every (document, KV head) is undecided, kept or evicted. The state holds
that as tensors updated in place (no growing index lists, no host syncs):

- `evicted[b, h, j]`: True once position j was evicted for document b, KV head h (for good).
- `entry_scores[b, h, j]`: the scorer's value for j, for scorers that score a token once, when it
  enters the cache (KVzap).
- `attention_received[b, h, j]`: for accumulating scorers (H2O), the attention probability that
  the queries processed so far put on key j, summed over queries and averaged over the query
  heads of the KV group.

Decisions are made per document: a document of length n stops at n even when longer documents of
the batch go on (padding on the right), so the batch size never changes a document's result.
"""

from dataclasses import dataclass

import torch


@dataclass
class LayerEviction:
    evicted: torch.Tensor  # (batch, kv_heads, capacity) bool
    lengths: torch.Tensor  # (batch,) long: each document's number of tokens
    entry_scores: torch.Tensor | None = None  # (batch, kv_heads, capacity) float32
    attention_received: torch.Tensor | None = None  # (batch, kv_heads, capacity) float32

    @classmethod
    def allocate(
        cls, lengths: torch.Tensor, kv_heads: int, capacity: int, *, entry_scores: bool, accumulate_attention: bool
    ) -> "LayerEviction":
        shape = (lengths.shape[0], kv_heads, capacity)
        device = lengths.device
        return cls(
            evicted=torch.zeros(shape, dtype=torch.bool, device=device),
            lengths=lengths,
            entry_scores=torch.zeros(shape, dtype=torch.float32, device=device) if entry_scores else None,
            attention_received=torch.zeros(shape, dtype=torch.float32, device=device) if accumulate_attention else None,
        )

    def visible_keys(self, query_len: int, key_len: int) -> torch.Tensor:
        """Boolean mask (batch, kv_heads, query_len, key_len): which keys each query may attend to.

        The queries are the last `query_len` positions of the cache; a query sees the earlier keys
        that are not evicted, and the keys of its own chunk causally.
        """
        device = self.evicted.device
        key_pos = torch.arange(key_len, device=device)
        query_pos = torch.arange(key_len - query_len, key_len, device=device)
        causal = key_pos[None, :] <= query_pos[:, None]  # (q, k)
        return causal[None, None] & ~self.evicted[:, :, None, :key_len]

    def valid_queries(self, query_len: int, key_len: int) -> torch.Tensor:
        """(batch, query_len) float: 1 for a real token of the document, 0 for right padding."""
        query_pos = torch.arange(key_len - query_len, key_len, device=self.lengths.device)
        return (query_pos[None, :] < self.lengths[:, None]).float()
