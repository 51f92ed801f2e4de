"""Evicted entries freed: a context compressed once, gathered into a cache of what it keeps.

In kvpress's protocol (`compress_once`) the press decides the context once, after its pass. The
masked engine then keeps the whole context's cache and hides what was evicted, so every later
pass reads (and the GPU holds) the full context. Compaction instead gathers, per layer, document
and KV head, the decided entries kept into the first slots of a new cache, in their order, and
frees the old one: the question's pass and every decoding step attend to `width` such slots,
`width` the most any layer, document and head keeps, then the window's, the follow-up's and the
answer's slots.

The window's positions (the last `sliding_window_size` of the context) are not decided yet, so
every head keeps them: they sit at the same slots in every head, with their own positions, and a
press that goes on deciding while decoding (`DMSPress(decoding=True)`) finds them, and the
question's and answer's, by position as the masked engine does. Those later evictions are masked,
not freed. A decided entry's layout position is its slot: the positions of its entries differ
per head, and every later decision lies at or after the window's first position, which no slot
of the decided block reaches (the sinks, kept first in every head, sit at their own positions).

Why per-head gathers and not pages: a fixed ratio keeps the same count in every head of a
document (kvpress's `ScorerPress`), so a dense (batch, heads, width) block wastes only the spread
between documents, layers and heads (AdaKV's and KVzip's budgets, thresholds); the attention
kernels read it unchanged, slots below `width` that a head does not fill flagged evicted.

The same keys and values are attended to: results equal the masked engine's up to the rounding
of sums over a shorter key axis (the tests hold 1e-5 relative NLL in float32 on the CPU, the same
greedy tokens, the same counts). Keys are stored after the rotary embedding, so an entry may move.
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
    """The passes after compaction, over `layout`: the decided block [0, width), the window block
    [width, width + window), the follow-up's slots, then the answer's. `counts` and
    `evicted_per_layer` are the decided block's, per document, taken at the decision."""

    passes: StaticPasses
    layout: BatchLayout
    width: int
    window: int
    counts: list[dict[str, int]]
    evicted_per_layer: list[list[int]]

    @property
    def follow_slot(self) -> int:
        return self.width + self.window

    def kv_counts(self, press) -> tuple[list[dict[str, int]], list[list[int]]]:
        """Per document, the KV counts and the entries evicted per layer at the end, as the masked
        engine's press gives them: the decided block's, taken at the decision, and the rest's (the
        window, the follow-up, the answer) from the press's states now."""
        later = press.kv_counts_per_document(from_slot=self.width)
        counts = [
            {key: decided[key] + now[key] for key in decided} for decided, now in zip(self.counts, later, strict=True)
        ]
        # (as `compress_once.evicted_per_layer`: padding slots are never decided, so never evicted)
        evicted = [
            press.layers[index].evicted[:, :, self.width :].sum((1, 2)).tolist() for index in sorted(press.layers)
        ]
        per_layer = [[before + now for before, now in zip(row, column, strict=True)]
                     for row, column in zip(self.evicted_per_layer, zip(*evicted, strict=True), strict=True)]  # fmt: skip
        return counts, per_layer


class KeptContexts:
    """The kept entries of a batch's contexts, gathered group after group of documents (each
    group's context pass run alone, so that only one group's whole cache exists at a time), into
    one cache per layer of (batch, KV heads, width + window + `tail`, head dim).

    Two blocks per document: the entries decided and kept (positions before n - `window`), per KV
    head in their order, as wide as the widest (layer, document, head) keeps; then the window's
    `window` positions [n - window, n), undecided and so kept by every head, at the same slots in
    every head with their own positions, so that decisions made later (`decoding`) find them by
    position; `tail` slots for the follow-up and the answer. The cache grows (one copy) when a
    group keeps more than any before. With `decoding`, the state the press decides the window
    with later (entry scores, the attention received, a scorer's own) is carried to the cache."""

    def __init__(self, batch: int, window: int, tail: int, decoding: bool):
        self.batch, self.window, self.tail, self.decoding, self.width = batch, window, tail, decoding, 0
        self.storage: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer
        self.kept_counts: list[torch.Tensor] = []  # per layer, (batch, heads): the decided block's fill
        self.window_starts = torch.zeros(batch, dtype=torch.long)  # n - window (at least 0)
        self.window_lengths = torch.zeros(batch, dtype=torch.long)
        self.carried: list[dict] = []  # per layer, with decoding: the window's state, (batch, heads, window)
        self.scorer_states: list[list] = []  # per layer, with decoding: each group's scorer state
        self.counts: list[dict[str, int]] = []
        self.evicted_per_layer: list[list[int]] = []

    def add(self, press, passes: StaticPasses, rows: slice, counts: list[dict], evicted_per_layer: list[list]):
        """The documents `rows` of the batch, after their context's pass over `passes` (contexts
        right-padded from slot 0: slot = position; the press's one decision made): their entries
        gathered, the press's counts (`counts`, `evicted_per_layer`, per document) noted for the
        decided block, and `passes`' cache emptied (freed once the caller lets it go)."""
        position = passes.layout.position
        lengths = (position >= 0).sum(1)
        starts = (lengths - self.window).clamp(min=0)
        window_lengths = lengths - starts
        self.window_starts[rows], self.window_lengths[rows] = starts.cpu(), window_lengths.cpu()
        config_entries = len(passes.cache.layers) * passes.cache.layers[0].keys.shape[1]
        for row, n in zip(counts, window_lengths.tolist(), strict=True):  # the window is counted later
            self.counts.append({**row, "kv_total": row["kv_total"] - n * config_entries,
                                "kv_kept": row["kv_kept"] - n * config_entries})  # fmt: skip
        self.evicted_per_layer += evicted_per_layer
        decided = (position >= 0) & (position < starts[:, None])
        kept = [~press.layers[index].evicted & decided.to(layer.keys.device)[:, None]
                for index, layer in enumerate(passes.cache.layers)]  # fmt: skip
        kept_counts = [mask.sum(-1) for mask in kept]
        # One host read per group: the widest (layer, document, head) sets the width.
        self._grow(int(max(c.max().item() for c in kept_counts)), passes.cache.layers)
        window_slots = (starts[:, None] + torch.arange(self.window, device=position.device)).clamp(
            max=position.shape[1] - 1
        )  # fmt: skip
        window_block = slice(self.width, self.width + self.window)
        for index, (layer, mask) in enumerate(zip(passes.cache.layers, kept, strict=True)):
            # Kept entries first, in slot order (a stable sort of "not kept"), then the first `width`.
            width = min(self.width, mask.shape[-1])
            order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
            window = window_slots.to(layer.keys.device)[:, None].expand(-1, layer.keys.shape[1], -1)
            keys, values = self.storage[index]
            for block, where in ((slice(0, width), order), (window_block, window)):
                gather = where[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
                keys[rows, :, block] = layer.keys.gather(2, gather)
                values[rows, :, block] = layer.values.gather(2, gather)
            self.kept_counts[index][rows] = kept_counts[index]
            if self.decoding:
                self._carry(index, press.layers[index], rows, window_slots)
            layer.keys, layer.values = None, None
        passes.cache.layers.clear()

    def _carry(self, index: int, state: LayerEviction, rows: slice, window_slots: torch.Tensor) -> None:
        """The window's entry scores, attention received and recorded decisions, and the group's scorer state."""
        if len(self.carried) <= index:
            self.carried.append({})
            self.scorer_states.append([])
        for name in ("entry_scores", "attention_received", "decision_scores"):
            values = getattr(state, name)
            if values is None:
                continue
            where = window_slots.to(values.device)[:, None].expand(-1, values.shape[1], -1)
            if name not in self.carried[index]:
                shape = (self.batch, values.shape[1], self.window)
                self.carried[index][name] = torch.zeros(shape, dtype=values.dtype, device=values.device)
            self.carried[index][name][rows] = values.gather(2, where)
        self.scorer_states[index].append(state.scorer_state)

    def _grow(self, width: int, layers) -> None:
        if self.storage and width <= self.width:
            return
        width = max(width, self.width)
        grown = []
        for index, layer in enumerate(layers):
            shape = (self.batch, layer.keys.shape[1], width + self.window + self.tail, layer.keys.shape[-1])
            keys, values = (torch.zeros(shape, dtype=layer.keys.dtype, device=layer.keys.device) for _ in range(2))
            if self.storage:
                # The decided block stays in place; the window block moves after the wider one.
                old_keys, old_values = self.storage[index]
                old_window = slice(self.width, self.width + self.window)
                for new, old in ((keys, old_keys), (values, old_values)):
                    new[:, :, : self.width] = old[:, :, : self.width]
                    new[:, :, width : width + self.window] = old[:, :, old_window]
                self.storage[index] = None  # the old copy goes before the next layer's grows
            else:
                counts = torch.zeros((self.batch, layer.keys.shape[1]), dtype=torch.long, device=layer.keys.device)
                self.kept_counts.append(counts)
            grown.append((keys, values))
        self.storage, self.width = grown, width

    def open(self, model, press, follow_positions: torch.Tensor, document_keys, cuda_graphs=None, clock=None):
        """The passes over the compacted cache (the follow-up's slots at `follow_positions`, (batch,
        follow width), -1 padding; the answer's after), with the press's layers moved to it:
        deciding nothing more, or with `decoding` deciding on from the window. Inside the press's
        context."""
        batch, follow_width = follow_positions.shape
        width, window, capacity = self.width, self.window, self.width + self.window + self.tail
        device = follow_positions.device
        per_document = torch.stack([counts.amax(-1).to(device) for counts in self.kept_counts]).amax(0)
        slots = torch.arange(capacity, device=device)
        position = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        # A decided entry's layout position is its slot (its entries' own differ per head): below
        # every position the press decides later (n - window on), and the sinks (kept first, in
        # every head) at their own positions.
        position[:, :width] = torch.where(slots[None, :width] < per_document[:, None], slots[None, :width], -1)
        offsets = torch.arange(window, device=device)
        starts, lengths = self.window_starts.to(device), self.window_lengths.to(device)
        position[:, width : width + window] = torch.where(offsets < lengths[:, None], starts[:, None] + offsets, -1)
        position[:, width + window : width + window + follow_width] = follow_positions
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        layout = BatchLayout(
            position=position, tokens_before=zeros, tokens_after=zeros.clone(),
            max_gap=capacity,  # decisions and H2O's sums look over the whole cache: positions run ahead of slots
            document_keys=document_keys,
        )  # fmt: skip
        passes = StaticPasses(model, layout, 1, capacity, cuda_graphs, clock, storage=self.storage)
        self.storage = []
        for module in (layer.self_attn for layer in decoder_of(model).layers):
            index = module.layer_idx
            layer_layout = layout.on(module_device(module))
            fill = self.kept_counts[index].to(layer_layout.position.device)
            unfilled = slots[:width].to(fill.device) >= fill[..., None]  # a head's slots of the decided block
            if self.decoding:
                state = LayerEviction.allocate(
                    layer_layout, fill.shape[1], entry_scores=press.scores_on_entry,
                    accumulate_attention=press.accumulates_attention,
                    record_decisions=press.press is not None and press.record_decisions,
                )  # fmt: skip
                for name, values in self.carried[index].items():
                    getattr(state, name)[:, :, width : width + window] = values
                state.scorer_state = _joined(self.scorer_states[index])
                if state.attention_received is not None:
                    state.decision_window = press.sliding_window_size
            else:
                evicted = torch.zeros((batch, fill.shape[1], capacity), dtype=torch.bool, device=fill.device)
                state = LayerEviction(layout=layer_layout, evicted=evicted, decided_once=True)
            state.evicted[:, :, :width] = unfilled
            press.layers[index] = state
            setattr(module, STATE_ATTRIBUTE, state)
        return CompactedContext(passes, layout, width, window, self.counts, self.evicted_per_layer)


def _joined(states: list):
    """The groups' scorer states as one batch's: tensors (a document per row) and dicts of them
    joined along the batch, None kept None."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states)
    if isinstance(first, dict):
        return {key: _joined([state[key] for state in states]) for key in first}
    return first
