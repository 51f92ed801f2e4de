"""Per-layer eviction state of a batch being streamed through the model.

Cache slots are shared by the documents of a batch; `BatchLayout` says which document position
each slot holds (-1: padding). Streaming pads on the right (slot = position); generation appends
every document's new token at the same slot, so a shorter prompt leaves a gap of padding slots
before its generated tokens. All semantics (windows, sinks, H2O's query counts) are in document
positions, so a document's result does not depend on the batch it is in.

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

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF


def document_key(tokens) -> int:
    """A 32-bit name of a document, from its tokens: the same wherever and with whatever it runs."""
    return int.from_bytes(hashlib.sha256(np.asarray(tokens, dtype="<i8").tobytes()).digest()[:4], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xor-shift-multiply). Every product stays below 2**63."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x1B873593) & _MASK32
    return x ^ (x >> 16)


def _combine(h: torch.Tensor, value) -> torch.Tensor:
    return _mix32((h ^ (value + 0x9E3779B9 + ((h << 6) & _MASK32) + (h >> 2))) & _MASK32)


def random_uniform(
    seed: int, document_keys: torch.Tensor, layer: int, heads: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Uniform numbers in [0, 1) (24 bits), one per (document, KV head, position): a hash of (seed,
    document key, layer, head, position), so independent of how documents are batched or chunked.
    `document_keys`: (batch,); `heads`: (kv_heads,); `positions`: (batch, n). Returns (batch,
    kv_heads, n) float32."""
    h = _mix32(torch.full_like(document_keys, seed & _MASK32))
    h = _combine(h, document_keys & _MASK32)[:, None, None]
    h = _combine(h, layer)
    h = _combine(h, heads.to(h.dtype)[None, :, None])
    h = _combine(h, positions.clamp(min=0)[:, None, :] & _MASK32)
    return (h >> 8).to(torch.float32) / float(1 << 24)


@dataclass
class BatchLayout:
    """Which document position each cache slot holds, and which slots the current pass fills.

    Before each pass the engine writes, in place: `tokens_before` / `tokens_after` (each document's
    tokens in the cache before and after the pass) and `query_slots` (the consecutive cache slots
    of the pass's queries), and sets `slots = (lo, hi)`, python bounds that contain every query
    slot of the pass. The pass attends to keys [0, hi) only; `hi` may lie beyond the last query
    (a fixed key length shared by many passes), the causal mask hides those keys.
    """

    position: torch.Tensor  # (batch, capacity) long: document position of each slot, -1 for padding
    tokens_before: torch.Tensor  # (batch,) long
    tokens_after: torch.Tensor  # (batch,) long
    query_slots: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (q,) long
    slots: tuple[int, int] = (0, 0)
    max_gap: int = 0  # the most padding slots any document has before its last token (python int)
    document_keys: torch.Tensor | None = None  # (batch,) long: `document_key` of each document
    # Copies of this layout on the other GPUs of a split model (device -> BatchLayout), for the
    # layers there; `sync` writes this one into them before each pass.
    mirrors: dict = field(default_factory=dict, repr=False, compare=False)
    query_slot_buffers: dict = field(default_factory=dict, repr=False, compare=False)  # a mirror's, by pass size

    @classmethod
    def right_padded(cls, documents: list[list[int]], capacity: int, device) -> "BatchLayout":
        lengths = torch.tensor([len(doc) for doc in documents], device=device)
        slots = torch.arange(capacity, device=device)
        position = torch.where(slots[None, :] < lengths[:, None], slots[None, :], -1)
        zeros = torch.zeros_like(lengths)
        keys = torch.tensor([document_key(doc) for doc in documents], dtype=torch.long, device=device)
        return cls(position=position, tokens_before=zeros, tokens_after=zeros.clone(), document_keys=keys)

    def assign(self, other: "BatchLayout") -> None:
        """Take `other`'s batch (same shape and max_gap), in place: the tensors a captured CUDA
        graph reads stay the same objects."""
        if other.position.shape != self.position.shape or other.max_gap != self.max_gap:
            raise ValueError("a layout is only reused for a batch of the same shape and max_gap")
        self.position.copy_(other.position)
        self.tokens_before.copy_(other.tokens_before)
        self.tokens_after.copy_(other.tokens_after)
        if self.document_keys is not None:
            self.document_keys.copy_(other.document_keys)
        # The mirrors too: the press's fresh state for this batch is made from them (a scorer's
        # random tables from the document keys) before the first pass syncs them.
        self.sync()

    def on(self, device: torch.device) -> "BatchLayout":
        """This layout as the layers on `device` read it: itself on its own device, else its mirror
        there (made on first use, then kept equal to it by `sync`)."""
        if device == self.position.device:
            return self
        if device not in self.mirrors:
            keys = None if self.document_keys is None else self.document_keys.to(device)
            self.mirrors[device] = BatchLayout(
                position=self.position.to(device), tokens_before=self.tokens_before.to(device),
                tokens_after=self.tokens_after.to(device), query_slots=self.query_slots.to(device),
                slots=self.slots, max_gap=self.max_gap, document_keys=keys,
            )  # fmt: skip
        return self.mirrors[device]

    def sync(self) -> None:
        """Before a pass: write this layout into its mirrors, in place. A mirror keeps one query-slot
        tensor per pass size, as this layout gets one from `StaticPasses`, so a graph reads the same one."""
        for mirror in self.mirrors.values():
            mirror.position.copy_(self.position)
            mirror.tokens_before.copy_(self.tokens_before)
            mirror.tokens_after.copy_(self.tokens_after)
            if mirror.document_keys is not None:
                mirror.document_keys.copy_(self.document_keys)
            q = len(self.query_slots)
            if q not in mirror.query_slot_buffers:
                mirror.query_slot_buffers[q] = torch.empty_like(self.query_slots, device=mirror.position.device)
            mirror.query_slots = mirror.query_slot_buffers[q].copy_(self.query_slots)
            mirror.slots, mirror.max_gap = self.slots, self.max_gap

    def read(self, tokens_before: torch.Tensor, tokens_after: torch.Tensor) -> None:
        """Before a forward pass: each document's token count before and after it (in place)."""
        self.tokens_before.copy_(tokens_before)
        self.tokens_after.copy_(tokens_after)


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


class KeyVisibility(NamedTuple):
    """Which keys each query sees, from per-key and per-query vectors rather than a (q x k) mask.

    A query in cache slot s sees key slot k if k <= s, the slot holds a token of its document
    (position[b, k] >= 0) and the token is not evicted for the KV head (not evicted[b, h, k]);
    and it always sees its own slot (k == s): for a real token that changes nothing (its own key
    is real and decided only after the pass); a padding query then never has an empty row, whose
    softmax would be NaN.
    """

    evicted: torch.Tensor  # (batch, kv_heads, >= k) bool
    position: torch.Tensor  # (batch, >= k) long: document position of each slot, -1 for padding
    query_slots: torch.Tensor  # (q,) long: the cache slot of each query of the pass

    def dense(self, hi: int) -> torch.Tensor:
        """The rule as a boolean mask (batch, kv_heads, q, hi) over the keys [0, hi)."""
        key_slot = torch.arange(hi, device=self.evicted.device)
        query_slot = self.query_slots[:, None]
        causal = key_slot[None, :] <= query_slot  # (q, k)
        own = key_slot[None, :] == query_slot
        real = self.position[:, None, None, :hi] >= 0
        return (causal[None, None] & real & ~self.evicted[:, :, None, :hi]) | own[None, None]


def _copied_into(kept, fresh):
    """`fresh` written into the tensors of `kept` (a tensor, a dict of them, or None), in place."""
    if isinstance(kept, torch.Tensor):
        return kept.copy_(fresh)
    if isinstance(kept, dict):
        return {key: _copied_into(kept[key], fresh[key]) for key in kept}
    return fresh
