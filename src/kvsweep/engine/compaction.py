"""Evicted entries freed: a context compressed once, gathered into a cache of what it keeps.

In kvpress's protocol without compression while decoding (`compress_once`), the press decides
once, after the context's pass, and nothing is evicted after. The masked engine then keeps the
whole context's cache and hides what was evicted, so every later pass reads (and the GPU holds)
the full context. Compaction instead gathers, per layer, document and KV head, the entries kept
into the first slots of a new cache, in their order, and frees the old one: the question's pass
and every decoding step attend to `width` context slots, `width` the most entries any layer,
document and head keeps, plus the follow-up's and the answer's slots.

Why per-head gathers and not pages: a fixed ratio keeps the same count in every head of a
document (kvpress's `ScorerPress`), so a dense (batch, heads, width) block wastes only the spread
between documents, layers and heads (AdaKV's and KVzip's budgets, thresholds); the attention
kernels read it unchanged, slots below `width` that a head does not fill flagged evicted.

The same keys and values are attended to in the same order: results equal the masked engine's up
to the rounding of sums over a shorter key axis (the tests hold 1e-5 relative NLL in float32 on
the CPU, the same greedy tokens, the same counts). Keys are stored after the rotary embedding,
so an entry's slot is free to move. A compacted slot's layout position is the slot itself: the
positions of its entries differ per head and nothing reads them once the press decides no more.
"""

from dataclasses import dataclass

import torch

from kvsweep.engine.attention import STATE_ATTRIBUTE
from kvsweep.engine.layout import BatchLayout
from kvsweep.engine.passes import StaticPasses
from kvsweep.engine.placement import decoder_of, module_device
from kvsweep.engine.state import LayerEviction


@dataclass
class CompactedContext:
    """The passes after compaction, over `layout`: context slots [0, width), the follow-up at
    [width, width + follow_width), then the answer's slots. `counts` and `evicted_per_layer` are
    the press's, per document, taken before (the press's own `kv_counts` reads the old layout)."""

    passes: StaticPasses
    layout: BatchLayout
    width: int
    counts: list[dict[str, int]]
    evicted_per_layer: list[list[int]]

    def kv_counts(self, tokens: torch.Tensor, n_context: torch.Tensor, entries: int) -> list[dict[str, int]]:
        """The KV counts at the end, as the masked engine's press gives them: every token written
        after the context (`tokens - n_context` per document) is kept, in each of `entries`
        (layers x KV heads); the compressible region is the context's, decided once."""
        added = ((tokens - n_context) * entries).tolist()
        return [
            {**counts, "kv_total": counts["kv_total"] + n, "kv_kept": counts["kv_kept"] + n}
            for counts, n in zip(self.counts, added, strict=True)
        ]


class KeptContexts:
    """The kept entries of a batch's contexts, gathered group after group of documents (each
    group's context pass run alone, so that only one group's whole cache exists at a time), into
    one cache per layer of (batch, KV heads, width + `tail`, head dim): `tail` slots for the
    follow-up and the answer. The cache grows (one copy) when a group keeps more than any before."""

    def __init__(self, batch: int, tail: int):
        self.batch, self.tail, self.width = batch, tail, 0
        self.storage: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer
        self.kept_counts: list[torch.Tensor] = []  # per layer, (batch, heads)
        self.counts: list[dict[str, int]] = []
        self.evicted_per_layer: list[list[int]] = []

    def add(self, press, passes: StaticPasses, rows: slice, counts: list[dict], evicted_per_layer: list[list]):
        """The documents `rows` of the batch, after their context's pass over `passes` (contexts
        right-padded from slot 0, the press's one decision made): their kept entries gathered, the
        press's counts (`counts`, `evicted_per_layer`, per document) noted, and `passes`' cache
        emptied (freed once the caller lets it go)."""
        self.counts += counts
        self.evicted_per_layer += evicted_per_layer
        real = passes.layout.position >= 0
        kept = [~press.layers[index].evicted & real.to(layer.keys.device)[:, None]
                for index, layer in enumerate(passes.cache.layers)]  # fmt: skip
        kept_counts = [mask.sum(-1) for mask in kept]
        # One host read per group: the widest (layer, document, head) sets the width.
        self._grow(int(max(c.max().item() for c in kept_counts)), passes.cache.layers)
        for index, (layer, mask) in enumerate(zip(passes.cache.layers, kept, strict=True)):
            # Kept entries first, in slot order (a stable sort of "not kept"), then the first `width`.
            width = min(self.width, mask.shape[-1])
            order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
            gather = order[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
            keys, values = self.storage[index]
            keys[rows, :, :width] = layer.keys.gather(2, gather)
            values[rows, :, :width] = layer.values.gather(2, gather)
            self.kept_counts[index][rows] = kept_counts[index]
            layer.keys, layer.values = None, None
        passes.cache.layers.clear()

    def _grow(self, width: int, layers) -> None:
        if self.storage and width <= self.width:
            return
        width = max(width, self.width)
        grown = []
        for index, layer in enumerate(layers):
            shape = (self.batch, layer.keys.shape[1], width + self.tail, layer.keys.shape[-1])
            keys, values = (torch.zeros(shape, dtype=layer.keys.dtype, device=layer.keys.device) for _ in range(2))
            if self.storage:
                old_keys, old_values = self.storage[index]
                keys[:, :, : self.width] = old_keys[:, :, : self.width]
                values[:, :, : self.width] = old_values[:, :, : self.width]
                self.storage[index] = None  # the old copy goes before the next layer's grows
            else:
                counts = torch.zeros((self.batch, layer.keys.shape[1]), dtype=torch.long, device=layer.keys.device)
                self.kept_counts.append(counts)
            grown.append((keys, values))
        self.storage, self.width = grown, width

    def open(self, model, press, follow_positions: torch.Tensor, document_keys, cuda_graphs=None, clock=None):
        """The passes over the compacted cache (the follow-up's slots at `follow_positions`, (batch,
        follow width), -1 padding; the answer's after), with the press's layers moved to it,
        deciding nothing more. Inside the press's context."""
        batch, follow_width = follow_positions.shape
        width, capacity = self.width, self.width + self.tail
        device = follow_positions.device
        per_document = torch.stack([counts.amax(-1).to(device) for counts in self.kept_counts]).amax(0)
        slots = torch.arange(capacity, device=device)
        position = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        position[:, :width] = torch.where(slots[None, :width] < per_document[:, None], slots[None, :width], -1)
        position[:, width : width + follow_width] = follow_positions
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        layout = BatchLayout(
            position=position, tokens_before=zeros, tokens_after=zeros.clone(),
            max_gap=capacity,  # nothing decides after compaction; the bound is never used
            document_keys=document_keys,
        )  # fmt: skip
        passes = StaticPasses(model, layout, 1, capacity, cuda_graphs, clock, storage=self.storage)
        self.storage = []
        for module in (layer.self_attn for layer in decoder_of(model).layers):
            layer_layout = layout.on(module_device(module))
            fill = self.kept_counts[module.layer_idx].to(layer_layout.position.device)
            evicted = torch.zeros((batch, fill.shape[1], capacity), dtype=torch.bool, device=fill.device)
            evicted[:, :, :width] = slots[:width].to(fill.device) >= fill[..., None]  # a head's unfilled slots
            state = LayerEviction(layout=layer_layout, evicted=evicted, decided_once=True)
            press.layers[module.layer_idx] = state
            setattr(module, STATE_ATTRIBUTE, state)
        return CompactedContext(passes, layout, width, self.counts, self.evicted_per_layer)
