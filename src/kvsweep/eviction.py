"""Per-layer eviction state of a batch being streamed through the model.

Cache slots are shared by the documents of a batch; `BatchLayout` says which document position
each slot holds (-1: padding). Streaming pads on the right (slot = position); generation appends
every document's new token at the same slot, so a shorter prompt leaves a gap of padding slots
before its generated tokens. All semantics (windows, sinks, H2O's query counts) are in document
positions, so a document's result does not depend on the batch it is in.

Per layer, `LayerEviction` holds as tensors updated in place (no growing index lists, no host syncs):
- `evicted[b, h, slot]`: True once the token was evicted for document b, KV head h (for good).
- `entry_scores[b, h, slot]`: the scorer's value, for scorers that score a token once, when it
  enters the cache (KVzap).
- `attention_received[b, h, slot]`: for accumulating scorers (H2O), the attention probability
  that the queries so far put on the key, summed over queries and averaged over the query heads
  of the KV group.
"""

from dataclasses import dataclass

import torch


@dataclass
class BatchLayout:
    """Which document position each cache slot holds, and how far each document has been read."""

    position: torch.Tensor  # (batch, capacity) long: document position of each slot, -1 for padding
    tokens_before: torch.Tensor  # (batch,) long: document tokens in the cache before the current pass
    tokens_after: torch.Tensor  # (batch,) long: ... after it
    max_gap: int = 0  # the most padding slots any document has before its last token (python int)

    @classmethod
    def right_padded(cls, lengths: torch.Tensor, capacity: int) -> "BatchLayout":
        slots = torch.arange(capacity, device=lengths.device)
        position = torch.where(slots[None, :] < lengths[:, None], slots[None, :], -1)
        zeros = torch.zeros_like(lengths)
        return cls(position=position, tokens_before=zeros, tokens_after=zeros.clone())

    def read(self, tokens_before: torch.Tensor, tokens_after: torch.Tensor) -> None:
        """Before a forward pass: each document's token count before and after it."""
        self.tokens_before = tokens_before
        self.tokens_after = tokens_after


@dataclass
class LayerEviction:
    layout: BatchLayout
    evicted: torch.Tensor  # (batch, kv_heads, capacity) bool
    entry_scores: torch.Tensor | None = None  # (batch, kv_heads, capacity) float32
    attention_received: torch.Tensor | None = None  # (batch, kv_heads, capacity) float32

    @classmethod
    def allocate(
        cls, layout: BatchLayout, kv_heads: int, *, entry_scores: bool, accumulate_attention: bool
    ) -> "LayerEviction":
        batch, capacity = layout.position.shape
        shape = (batch, kv_heads, capacity)
        device = layout.position.device
        return cls(
            layout=layout,
            evicted=torch.zeros(shape, dtype=torch.bool, device=device),
            entry_scores=torch.zeros(shape, dtype=torch.float32, device=device) if entry_scores else None,
            attention_received=torch.zeros(shape, dtype=torch.float32, device=device) if accumulate_attention else None,
        )

    def visible_keys(self, query_len: int, key_len: int) -> torch.Tensor:
        """Boolean mask (batch, kv_heads, query_len, key_len): which keys each query may attend to.

        The queries are the last `query_len` slots of the cache; a query sees the earlier keys
        that are neither evicted nor padding, and the keys of its own pass causally.
        """
        device = self.evicted.device
        key_slot = torch.arange(key_len, device=device)
        query_slot = torch.arange(key_len - query_len, key_len, device=device)
        causal = key_slot[None, :] <= query_slot[:, None]  # (q, k)
        real = self.layout.position[:, None, None, :key_len] >= 0
        return causal[None, None] & real & ~self.evicted[:, :, None, :key_len]

    def valid_queries(self, query_len: int, key_len: int) -> torch.Tensor:
        """(batch, query_len) float: 1 for a real token of the document, 0 for padding."""
        return (self.layout.position[:, key_len - query_len : key_len] >= 0).float()
