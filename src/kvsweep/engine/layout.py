"""Where each document's tokens lie in the cache slots a batch shares, and which keys a pass's
queries may see.

Cache slots are shared by the documents of a batch; `BatchLayout` says which document position
each slot holds (-1: padding). Streaming pads on the right (slot = position); generation appends
every document's new token at the same slot, so a shorter prompt leaves a gap of padding slots
before its generated tokens. All semantics (windows, sinks, H2O's query counts) are in document
positions, so a document's result does not depend on the batch it is in. Every tensor is
allocated once per batch and written in place, so that a pass reading them can be captured once
as a CUDA graph and replayed.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kvsweep.engine.random_scores import document_key


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
