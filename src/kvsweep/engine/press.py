"""Threshold eviction while a document streams through the model, in the style of DMS."""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress.presses.dms_press import DMSPress
from torch import nn

from kvsweep.engine.attention import ATTENTION_NAME, STATE_ATTRIBUTE
from kvsweep.engine.integration.fusions import fused
from kvsweep.engine.layout import BatchLayout
from kvsweep.engine.placement import decoder_of, module_device
from kvsweep.engine.scorers.base import as_streaming_scorer
from kvsweep.engine.state import LayerEviction
from kvsweep.kernels import decisions, entry_scores


@dataclass
class StreamingThresholdPress(DMSPress):
    """Evict a cached token whose score is below `threshold` once it leaves the protected window.

    Semantics (the contract the tests hold). The document streams in chunks [s, e). Per layer and
    KV head, each cached position j is undecided, kept or evicted. The chunk's queries see every
    earlier key that is not evicted, and their own chunk causally. After a chunk's pass, every
    undecided j < e - `sliding_window_size` is decided once, for good: evicted if its score is
    below `threshold`, else kept. Positions j < `sinks` are never evicted. An evicted key is hidden
    from every query head of its KV group by the attention mask of `kvsweep.engine.attention`.

    The score comes from the wrapped scorer (`press`, a kvpress press with the `StreamingScorer`
    contract of `kvsweep.engine.scorers.base`; any other `ScorerPress` scores on entry): either once, when the token enters the cache
    (`scores_on_entry`, e.g. KVzap: the surrogate applied to the layer's input hidden state;
    random, key norm, StreamingLLM), or at decision time: from the attention accumulated so far
    (`accumulates_attention`, H2O), or from the cache as it is then, over every visible key
    (Expected Attention, whose scorer also `observes_queries` on every pass).

    With `fixed_ratio` (kvpress's `compression_ratio`, for kvpress's protocol only) the budget is
    fixed instead of the threshold: at the first decision, per document and KV head, the
    `n - max(1, int(n * (1 - fixed_ratio)))` lowest-scored positions among those decided are evicted
    (n: the document's tokens so far, the context), as kvpress's `ScorerPress` keeps the
    `max(1, int(n * (1 - compression_ratio)))` highest (`kvpress.utils.compute_n_kept`); sinks and
    the window are never among them. Later passes decide nothing (`compress_once` without decoding).
    With `adaptive_safeguard` as well, the budget is AdaKV's (kvpress `AdaKVPress`): the layer's
    heads share it, the lowest scores over all of them evicted, each head keeping at least that
    share of its own.

    Extends kvpress's `DMSPress` (Dynamic Memory Sparsification, https://arxiv.org/abs/2506.05345):
    same fields and scorers, but eviction is a real mask rather than fake keys (which fail beyond a
    handful of queries per pass), works for any chunk and batch size, and supports sinks and
    scorers that accumulate attention. Call `begin(model, layout)` before each batch.
    """

    sinks: int = 0
    decoding: bool = True
    # Keep the score of every decision (calibration reads their distribution); off for evaluations.
    record_decisions: bool = False
    fixed_ratio: float | None = None
    adaptive_safeguard: float | None = None
    layers: dict[int, LayerEviction] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.press = as_streaming_scorer(self.press)
        if self.threshold is None or self.threshold != self.threshold:
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if self.sliding_window_size < 0 or self.sinks < 0:
            raise ValueError("sliding_window_size and sinks must be >= 0")
        if self.fixed_ratio is not None and not 0 <= self.fixed_ratio < 1:
            raise ValueError(f"fixed_ratio must lie in [0, 1), got {self.fixed_ratio!r}")
        if self.adaptive_safeguard is not None and not 0 <= self.adaptive_safeguard <= 1:
            raise ValueError(f"adaptive_safeguard must lie in [0, 1], got {self.adaptive_safeguard!r}")

    @classmethod
    def mask_only(cls) -> "StreamingThresholdPress":
        """No scorer, nothing evicted: the masked attention alone (padding, a static cache's
        unwritten slots). The uncompressed baseline runs through it."""
        return cls(None, threshold=float("-inf"), sliding_window_size=0)

    def post_init_from_model(self, model):
        if self.press is not None:
            self.press.post_init_from_model(model)

    def prepare_contexts(self, model: nn.Module, contexts: list[list[int]]) -> None:
        """Before the context's pass in kvpress's protocol, outside the press's hooks: a scorer that
        selects at a fixed ratio from passes of its own over each context (KVzip) runs them."""
        if self.press is not None and self.fixed_ratio is not None:
            self.press.prepare_contexts(model, contexts, self.fixed_ratio)

    @property
    def scores_on_entry(self) -> bool:
        return self.press is not None and self.press.scores_on_entry

    @property
    def accumulates_attention(self) -> bool:
        return self.press is not None and self.press.accumulates_attention

    def begin(self, model: nn.Module, layout: BatchLayout, reused: dict[int, LayerEviction] | None = None) -> None:
        """Allocate fresh eviction state for a batch laid out in the cache as `layout`. With `kept`
        (the states of an earlier batch of the same shape, over the same `layout` object), the
        fresh values are written into those states instead, which a captured graph reads."""
        config = model.config.get_text_config()
        for module in _attention_modules(model):
            # A split model's layer keeps its state on its own GPU, over the layout's copy there.
            layer_layout = layout.on(module_device(module))
            state = LayerEviction.allocate(
                layer_layout,
                config.num_key_value_heads,
                entry_scores=self.scores_on_entry,
                accumulate_attention=self.accumulates_attention,
                record_decisions=self.press is not None and self.record_decisions,
            )
            if self.press is not None:
                state.scorer_state = self.press.allocate(module, layer_layout)
            if state.attention_received is not None:
                state.decision_window = self.sliding_window_size
            if reused is not None:
                reused[module.layer_idx].assign(state)
                state = reused[module.layer_idx]
            self.layers[module.layer_idx] = state
            setattr(module, STATE_ATTRIBUTE, state)

    @contextmanager
    def __call__(self, model):
        """Hooks (kvpress's `BasePress.__call__`), the evicting attention, and kvsweep's fused
        kernels where the model's family has them (`kvsweep.engine.integration`), for the duration."""
        previous = model.config._attn_implementation
        try:
            with super().__call__(model), fused(model):
                model.set_attn_implementation(ATTENTION_NAME)
                yield
        finally:
            model.set_attn_implementation(previous)
            for module in _attention_modules(model):
                if hasattr(module, STATE_ATTRIBUTE):
                    delattr(module, STATE_ATTRIBUTE)
            self.layers.clear()
            if self.press is not None:
                self.press.forget_contexts()

    def forward_hook(self, module: nn.Module, input, kwargs: dict, output):
        if self.press is None:  # masking only (padding), nothing is evicted
            return output
        state = self.layers[module.layer_idx]
        if state.decided_once:  # its one decision is made (a fixed ratio's, a compacted context's)
            return output
        layout = state.layout
        hidden_states = kwargs["hidden_states"]
        slots = layout.query_slots  # the cache slots this pass wrote

        keys, values = _layer_cache(kwargs["past_key_values"], module.layer_idx)
        # A scorer may write the pass's scores into the state itself (KVzap's surrogate kernels on a
        # pass of a few tokens, `score_into`); else it is asked for them.
        if self.scores_on_entry and not self.press.score_into(module, hidden_states, state.entry_scores, slots):
            # A scorer that needs them (random eviction) reads the slots' positions from the layout.
            where = {**kwargs, "layout": layout, "scorer_state": state.scorer_state}
            # The pass's keys and values, gathered for scorers that read them (not KVzap's surrogate,
            # which reads the hidden states: two kernels a layer saved).
            pass_keys, pass_values = (
                (keys.index_select(2, slots), values.index_select(2, slots)) if self.press.reads_cache else (None, None)
            )
            new_scores = self.press.score(module, hidden_states, pass_keys, pass_values, None, where)
            if entry_scores.supports(state.entry_scores, new_scores, slots):
                entry_scores.store_entry_scores(state.entry_scores, new_scores, slots)
            else:
                state.entry_scores.index_copy_(2, slots, new_scores.float())
        if self.press.observes_queries:
            counted = layout.position.index_select(1, slots) >= self.sinks
            self.press.observe(module, hidden_states, state.scorer_state, counted.float())

        # Positions p that become decided in this pass: tokens_before - W <= p < tokens_after - W.
        # The pass's queries lie in slots [s, e) within the python bounds `layout.slots`; a slot
        # holds a position no later than itself and at most `max_gap` earlier, so only slots in
        # [s - W - max_gap, e - W) can hold one (python ints: no host sync, fixed for a CUDA graph).
        window = self.sliding_window_size
        first, last = layout.slots
        lo, hi = max(first - window - layout.max_gap, 0), max(last - window, 0)
        if hi <= lo:
            return output
        position = layout.position[:, lo:hi]
        evicted = state.evicted[:, :, lo:hi]
        if self.fixed_ratio is not None and self.press.selects_at_ratio:
            # The scorer chose the entries itself (KVzip: one budget over every layer and head).
            evicted |= _deciding(position, layout, self.sinks, window)[:, None, :] & self.press.selected(
                module, position
            )
            state.decided_once = True
            return output
        if self.scores_on_entry:
            scores = state.entry_scores[:, :, lo:hi]
        elif self.accumulates_attention:
            received = state.attention_received[:, :, lo:hi]
            if (
                self.fixed_ratio is None
                and self.press.decides_in_kernel()
                and state.decision_scores is None
                and decisions.supports(evicted, received)
            ):
                # The scorer's score (H2O's mean attention) computed in the decision kernel from the sums.
                decisions.evict_decided(
                    evicted, received, position, layout.tokens_before, layout.tokens_after, self.sinks, window,
                    self.threshold, mean_over_queries=True,
                )  # fmt: skip
                return output
            n_queries = layout.tokens_after[:, None] - position
            scores = self.press.score(module, hidden_states, None, None, received, {**kwargs, "n_queries": n_queries})
        else:  # scored at decision time from the cache as it is now (Expected Attention)
            seen = layout.position[:, :last]
            written = (seen >= self.sinks) & (seen < layout.tokens_after[:, None])
            visible = written[:, None, :] & ~state.evicted[:, :, :last]
            context = {
                **kwargs,
                "slot_range": (lo, hi),
                "position": position,
                "visible": visible,
                "scorer_state": state.scorer_state,
                "tokens": layout.tokens_after,
            }
            scores = self.press.score(module, hidden_states, keys[:, :, :last], values[:, :, :last], None, context)
        if self.fixed_ratio is None and state.decision_scores is None and decisions.supports(evicted, scores):
            # One kernel on a GPU for what follows (without recording the scores).
            decisions.evict_decided(
                evicted, scores, position, layout.tokens_before, layout.tokens_after, self.sinks, window, self.threshold
            )
            return output
        deciding = _deciding(position, layout, self.sinks, window)
        if self.fixed_ratio is None:
            evicted |= deciding[:, None, :] & (scores < self.threshold)
        else:
            evicted |= lowest_scored(
                scores, deciding, position, layout.tokens_after, self.fixed_ratio, self.adaptive_safeguard
            )
            state.decided_once = True
        if state.decision_scores is not None:
            recorded = state.decision_scores[:, :, lo:hi]
            recorded.copy_(torch.where(deciding[:, None, :], scores.float(), recorded))
        return output

    def kv_counts(
        self, sinks: int | None = None, window: int | None = None, from_slot: int = 0
    ) -> dict[str, torch.Tensor]:
        """Per document: KV entries kept and total (layers x KV heads x positions) at the end, and
        the same over the compressible region [sinks, n - window); over the cache slots from
        `from_slot` on (a compacted cache counts its decided block apart)."""
        sinks = self.sinks if sinks is None else sinks
        window = self.sliding_window_size if window is None else window
        return kv_counts(list(self.layers.values()), sinks, window, from_slot)

    def kv_counts_per_document(self, from_slot: int = 0) -> list[dict[str, int]]:
        """`kv_counts` as one dict of Python ints per document (one transfer from the device)."""
        counts = {key: value.tolist() for key, value in self.kv_counts(from_slot=from_slot).items()}
        return [dict(zip(counts, row, strict=True)) for row in zip(*counts.values(), strict=True)]

    @property
    def compression_ratio(self):
        counts = self.kv_counts()
        return float(1 - counts["kv_kept"].sum() / counts["kv_total"].sum())


def lowest_scored(
    scores: torch.Tensor,
    deciding: torch.Tensor,
    position: torch.Tensor,
    tokens: torch.Tensor,
    ratio: float,
    adaptive_safeguard: float | None = None,
) -> torch.Tensor:
    """(batch, heads, slots): per document, the slots of its `deciding` positions that kvpress
    would not keep at `ratio`, over its n = `tokens` positions, where the positions not deciding
    (sinks, the window) score +inf, so they are kept first. Per KV head (`ScorerPress`):
    `scores.topk(n_kept)` kept, n_kept = max(1, int(n * (1 - ratio))). With `adaptive_safeguard`
    (`AdaKVPress`): each head's top `max(1, int(n_kept * safeguard))` kept, then the heads * (n -
    n_kept) lowest over all heads evicted. With every position deciding (no sinks, no window) these
    are kvpress's own top-k calls on the same scores, ties included (torch's top-k breaks them its
    own way: key norms tie exactly where a token repeats in the first layer, as RoPE keeps the
    norm). One host read per document: a fixed ratio decides once, on the context's pass."""
    evicted = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    heads = scores.shape[1]
    for b, n in enumerate(tokens.tolist()):
        slots = deciding[b].nonzero().flatten()
        at = position[b, slots]
        full = torch.full((1, heads, n), torch.inf, dtype=scores.dtype, device=scores.device)
        full[0, :, at] = scores[b][:, slots]
        n_kept = max(1, int(n * (1 - ratio)))
        if adaptive_safeguard is None:
            kept = torch.zeros(full.shape, dtype=torch.bool, device=scores.device)
            kept.scatter_(-1, full.topk(n_kept, dim=-1).indices, True)
        else:
            n_safe = max(1, int(n_kept * adaptive_safeguard)) if adaptive_safeguard > 0 else 0
            full.scatter_(-1, full.topk(n_safe, dim=-1).indices, torch.finfo(full.dtype).max)
            pruned = torch.topk(-full.reshape(1, -1), heads * (n - n_kept), dim=1).indices
            kept = torch.ones(heads * n, dtype=torch.bool, device=scores.device)
            kept[pruned[0]] = False
            kept = kept.view(1, heads, n)
        evicted[b][:, slots] = ~kept[0][:, at]
    return evicted


def kv_counts(states: list[LayerEviction], sinks: int, window: int, from_slot: int = 0) -> dict[str, torch.Tensor]:
    """The counts of `StreamingThresholdPress.kv_counts` over the slots from `from_slot` on (a
    compacted cache counts its decided block apart: `kvsweep.engine.compaction`)."""
    layout = states[0].layout
    position = layout.position[:, from_slot:]
    in_doc = position >= 0
    compressible = (position >= sinks) & (position < (layout.tokens_after - window)[:, None])
    kv_heads = states[0].evicted.shape[1]
    # (batch, capacity), summed on each layer's device (a split model's are on several GPUs)
    evicted = sum(state.evicted[:, :, from_slot:].sum(1).to(position.device) for state in states)
    n_entries = len(states) * kv_heads
    return {
        "kv_total": in_doc.sum(1) * n_entries,
        "kv_kept": in_doc.sum(1) * n_entries - (evicted * in_doc).sum(1),
        "kv_total_compressible": compressible.sum(1) * n_entries,
        "kv_kept_compressible": compressible.sum(1) * n_entries - (evicted * compressible).sum(1),
    }


def _deciding(position: torch.Tensor, layout: BatchLayout, sinks: int, window: int) -> torch.Tensor:
    """(batch, slots): the positions this pass decides, tokens_before - W <= p < tokens_after - W,
    the sinks excepted."""
    return (
        (position >= sinks)
        & (position >= (layout.tokens_before - window)[:, None])
        & (position < (layout.tokens_after - window)[:, None])
    )


def _attention_modules(model):
    return [layer.self_attn for layer in decoder_of(model).layers]


def _layer_cache(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values
