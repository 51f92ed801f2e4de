"""Per-layer eviction state of a batch being streamed through the model.

Every tensor here is allocated once per batch and updated in place (no growing index lists, no
host syncs), so that a forward pass reading them can be captured once as a CUDA graph and replayed.

Per layer, `LayerEviction` holds:
- `evicted[b, h, slot]`: True once the token was evicted for document b, KV head h (for good).
- `entry_scores[b, h, slot]`: the scorer's value, for scorers that score a token once, when it
  enters the cache (KVzap).
- `attention_received[b, h, slot]`: for accumulating scorers (H2O), the attention probability
  that the queries so far put on the key, summed over queries and averaged over the query heads
  of the KV group; exact until the key is decided, after which it may stop growing (the Triton
  kernels skip the sums of keys decided before a pass: `decision_window`).
- `decision_scores[b, h, slot]` (only when asked, for calibration): the score each position had
  when it was decided, NaN until then.
"""

from dataclasses import dataclass

import torch

from kvsweep.engine.layout import BatchLayout, KeyVisibility


@dataclass
class LayerEviction:
    layout: BatchLayout
    evicted: torch.Tensor  # (batch, kv_heads, capacity) bool
    entry_scores: torch.Tensor | None = None  # (batch, kv_heads, capacity) float32
    attention_received: torch.Tensor | None = None  # (batch, kv_heads, capacity) float32
    decision_scores: torch.Tensor | None = None  # (batch, kv_heads, capacity) float32, NaN until decided
    scorer_state: dict | None = None  # what a scorer keeps across passes (Expected Attention's query sums)
    # With accumulated attention: positions below tokens_before - decision_window were decided
    # before the pass, so their sums are not needed any more (None: every key keeps receiving).
    decision_window: int | None = None
    # A fixed ratio (`StreamingThresholdPress.fixed_ratio`) decides once per batch, at its first
    # pass; a compacted context (`kvsweep.engine.compaction`) has been decided for good.
    decided_once: bool = False

    @classmethod
    def allocate(
        cls,
        layout: BatchLayout,
        kv_heads: int,
        *,
        entry_scores: bool,
        accumulate_attention: bool,
        record_decisions: bool = False,
    ) -> "LayerEviction":
        batch, capacity = layout.position.shape
        shape = (batch, kv_heads, capacity)
        device = layout.position.device
        return cls(
            layout=layout,
            evicted=torch.zeros(shape, dtype=torch.bool, device=device),
            entry_scores=torch.zeros(shape, dtype=torch.float32, device=device) if entry_scores else None,
            attention_received=torch.zeros(shape, dtype=torch.float32, device=device) if accumulate_attention else None,
            decision_scores=torch.full(shape, float("nan"), device=device) if record_decisions else None,
        )

    def assign(self, fresh: "LayerEviction") -> None:
        """Take a freshly allocated state's values (a new batch of the same shape), in place."""
        # A captured graph holds the window as a constant: kept passes serve the same press only.
        if fresh.decision_window != self.decision_window:
            raise ValueError("a kept state is only reused with the same decision window")
        for name in ("evicted", "entry_scores", "attention_received", "decision_scores"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(fresh, name))
        self.scorer_state = _copied_into(self.scorer_state, fresh.scorer_state)
        self.decided_once = fresh.decided_once

    def key_visibility(self) -> "KeyVisibility":
        """Which keys the pass's queries may attend to, in the factored form the Triton kernels read."""
        return KeyVisibility(self.evicted, self.layout.position, self.layout.query_slots)

    def visible_keys(self) -> torch.Tensor:
        """Boolean mask (batch, kv_heads, q, hi) of the keys [0, hi) each query may attend to
        (`KeyVisibility.dense`), for the torch paths."""
        return self.key_visibility().dense(self.layout.slots[1])

    def valid_queries(self) -> torch.Tensor:
        """(batch, q) float: 1 for a real token of the document, 0 for padding."""
        return (self.layout.position.index_select(1, self.layout.query_slots) >= 0).float()


def _copied_into(kept, fresh):
    """`fresh` written into the tensors of `kept` (a tensor, a dict of them, or None), in place."""
    if isinstance(kept, torch.Tensor):
        return kept.copy_(fresh)
    if isinstance(kept, dict):
        return {key: _copied_into(kept[key], fresh[key]) for key in kept}
    return fresh
