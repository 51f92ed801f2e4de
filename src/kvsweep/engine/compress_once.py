"""kvpress's protocol: the context prefilled whole and compressed once, then the question and the
answer (or a continuation to score) without further eviction unless `decoding` is asked for.

This is what `pipeline("kv-press-text-generation", press=DMSPress(scorer, threshold, ...))` does
(kvpress 0.5.5, `KVPressTextGenerationPipeline._forward`): one forward pass over the context, in
which every query sees every context key; then the press decides once, for every position j of the
context with j < n_context - W, by the same rule as streaming (`StreamingThresholdPress`); then the
question is one uncompressed pass, and greedy decoding follows. With `decoding`, the press keeps
deciding after the question's pass and after each new token, as `DMSPress(decoding=True)` does.
The entries the context's decision evicts are freed: the kept ones are gathered into a smaller
cache (`kvsweep.engine.compaction`) that the question and the answer read; those evicted while
decoding are masked there. With `compact=False` every eviction is masked in the whole cache, as in
streaming (the reference). kvpress replaces masked keys with a "fake key" per pass (or, for a
scorer press, removes them), which reaches the same attention up to float rounding.

Documents share cache slots as in `stream_generate`: contexts from slot 0 (padding on the right),
every question at the same slots after the longest context (after the compacted context's slots
when compacting), then one slot per new token, each token with its own position id, so the batch
never changes a document's result.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsweep.engine.compaction import CompactedContext, KeptContexts
from kvsweep.engine.generate import DecodeTiming, GreedyAnswers
from kvsweep.engine.layout import BatchLayout
from kvsweep.engine.passes import StaticPasses
from kvsweep.engine.placement import decoder_of
from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.random_scores import document_key
from kvsweep.engine.stream_nll import right_padded_ids


def _layout(contexts, follow_ups, extra_slots: int, device, compact: bool, capacity: int | None = None) -> BatchLayout:
    """The batch's layout: contexts in slots [0, Wc), each follow-up (question or continuation) in
    [Wc, Wc + Wf) at positions n_context + k, and `extra_slots` more for generated tokens; with
    `compact`, the contexts' slots only (the rest goes in the compacted cache), or `capacity` slots
    (a scorer's state by position covers every position the answer will reach)."""
    width_context = max(len(c) for c in contexts)
    if compact:
        layout = BatchLayout.right_padded(contexts, capacity or width_context, device)
        layout.max_gap = width_context - min(len(c) for c in contexts)
        return layout
    width_follow = max(len(f) for f in follow_ups)
    layout = BatchLayout.right_padded(contexts, width_context + width_follow + extra_slots, device)
    for row, (context, follow) in enumerate(zip(contexts, follow_ups, strict=True)):
        slots = slice(width_context, width_context + len(follow))
        layout.position[row, slots] = torch.arange(len(context), len(context) + len(follow), device=device)
    layout.max_gap = max(
        width_context - len(c) + width_follow - len(f) for c, f in zip(contexts, follow_ups, strict=True)
    )
    return layout


@dataclass
class Prefilled:
    """After the context's and the follow-up's passes: the passes and layout the answer continues
    in (the compacted ones with `compacted`), the logits at each context's last token (batch,
    vocab), the follow-up's (batch, Wf, vocab), each document's token count, and the first slot
    after the follow-up."""

    passes: StaticPasses
    layout: BatchLayout
    context_last: torch.Tensor
    follow: torch.Tensor
    count: torch.Tensor
    answer_slot: int
    compacted: CompactedContext | None

    def kv_counts(self, press: StreamingThresholdPress):
        """Per document, the KV counts at the end and the entries evicted per layer."""
        if self.compacted is None:
            return press.kv_counts_per_document(), evicted_per_layer(press)
        return self.compacted.kv_counts(press)


def _context_pass(model, press, contexts, layout, cuda_graphs, clock) -> tuple[StaticPasses, torch.Tensor]:
    """`press.begin`, then the contexts' one pass (inside the press's context). Returns the passes
    and the logits at each context's last token (batch, vocab)."""
    device = model.device
    width_context = max(len(c) for c in contexts)
    n_context = torch.tensor([len(c) for c in contexts], device=device)
    press.begin(model, layout)
    # One key bucket over the whole cache: the context is a single pass of Wc queries. It runs
    # once: eagerly (capturing a graph to replay it once would cost more); decoding replays its own.
    passes = StaticPasses(model, layout, width_context, layout.position.shape[1], cuda_graphs, clock)
    passes.cuda_graphs = False
    layout.read(torch.zeros_like(n_context), n_context)
    positions = torch.arange(width_context, device=device).expand(len(contexts), -1)
    # Only the logits at each context's last token (the continuation's first prediction): the
    # whole pass's would be batch x Wc x vocabulary (8 GiB at 32k tokens and 128k words in bf16).
    last, which = torch.unique(n_context - 1, return_inverse=True)
    logits = passes.run(right_padded_ids(contexts, width_context, device), positions, 0, logits_at=last)
    rows = torch.arange(len(contexts), device=logits.device)
    return passes, logits[rows, which.to(logits.device)].float().to(device)


@contextmanager
def _prefilled(model, press, contexts, follow_ups, extra_slots, decoding, compact, prefill_batch, cuda_graphs, clock):
    """The context's pass (with `compact`: per group of `prefill_batch` documents, each compacted
    before the next), then the follow-up's; yields the `Prefilled` answer state while the press's
    context is active."""
    device = model.device
    width_follow = max(len(f) for f in follow_ups)
    cuda_graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
    n_context = torch.tensor([len(c) for c in contexts], device=device)
    n_follow = torch.tensor([len(f) for f in follow_ups], device=device)
    follow_positions = n_context[:, None] + torch.arange(width_follow, device=device)[None, :]
    if not compact:
        layout = _layout(contexts, follow_ups, extra_slots, device, False)
        press.prepare_contexts(model, contexts)
        with press(model):
            passes, context_last = _context_pass(model, press, contexts, layout, cuda_graphs, clock)
            follow_slot = max(len(c) for c in contexts)
            yield _follow_up(passes, layout, context_last, follow_ups, follow_positions, follow_slot, None,
                             n_context, n_follow, decoding, cuda_graphs)  # fmt: skip
        return
    kept = KeptContexts(len(contexts), press.sliding_window_size, width_follow + extra_slots, decoding)
    # While decoding, a scorer's state by position (random's) must reach the answer's positions.
    capacity = max(len(c) for c in contexts) + width_follow + extra_slots if decoding else None
    context_last = []
    group = prefill_batch or len(contexts)
    for start in range(0, len(contexts), group):
        rows = slice(start, start + group)
        # A scorer that selects from passes of its own (KVzip) runs them outside the press's hooks.
        press.prepare_contexts(model, contexts[rows])
        with press(model):
            layout = _layout(contexts[rows], follow_ups[rows], 0, device, True, capacity)
            passes, last = _context_pass(model, press, contexts[rows], layout, cuda_graphs, clock)
            kept.add(press, passes, rows, press.kv_counts_per_document(), evicted_per_layer(press))
            context_last.append(last)
            del passes
    with press(model):
        padded = torch.where(follow_positions < (n_context + n_follow)[:, None], follow_positions, -1)
        keys = torch.tensor([document_key(c) for c in contexts], dtype=torch.long, device=device)
        compacted = kept.open(model, press, padded, keys, cuda_graphs, clock)
        yield _follow_up(compacted.passes, compacted.layout, torch.cat(context_last), follow_ups, follow_positions,
                         compacted.follow_slot, compacted, n_context, n_follow, decoding, cuda_graphs)  # fmt: skip


def _follow_up(passes, layout, context_last, follow_ups, follow_positions, follow_slot, compacted, n_context,
               n_follow, decoding, cuda_graphs) -> Prefilled:  # fmt: skip
    """The follow-up's pass (eager, as the context's), after the context's."""
    # Without `decoding`, no later pass decides anything: no position enters [before - W, after - W).
    after = n_context + n_follow if decoding else n_context
    layout.read(n_context, after)
    passes.cuda_graphs = False
    width_follow = follow_positions.shape[1]
    follow = passes.run(right_padded_ids(follow_ups, width_follow, n_context.device), follow_positions, follow_slot)
    passes.cuda_graphs = cuda_graphs
    return Prefilled(
        passes, layout, context_last, follow.float().to(n_context.device), n_context + n_follow,
        follow_slot + width_follow, compacted,
    )  # fmt: skip


def evicted_per_layer(press: StreamingThresholdPress) -> list[list[int]]:
    """Per document, per layer: the entries evicted (over KV heads and positions), the count
    kvpress keeps as `len(module.masked_key_indices[0])` for a batch of one."""
    per_layer = [press.layers[i].evicted.sum((1, 2)).tolist() for i in sorted(press.layers)]
    return [list(row) for row in zip(*per_layer, strict=True)]


def kvpress_evicted_per_layer(model) -> list[int]:
    """What kvpress's pipeline evicted in each layer of `model` (batch of one): the length of the
    attention modules' `masked_key_indices`, which its `DMSPress` leaves set after a run. Clears
    them, as the next prefill would. The count `evicted_per_layer` is compared with."""
    counts = []
    for layer in decoder_of(model).layers:
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        counts.append(0 if indices is None else len(indices[0]))
        layer.self_attn.masked_key_indices = None
    return counts


@torch.inference_mode()
def compress_once_generate(
    model,
    contexts: list[list[int]],
    questions: list[list[int]],
    max_new_tokens: int,
    press: StreamingThresholdPress | None = None,
    decoding: bool = False,
    eos_token_ids: set[int] | None = None,
    cuda_graphs: bool | None = None,
    clock=None,
    compact: bool = True,
    prefill_batch: int | None = None,
    stats: dict | None = None,
) -> list[dict]:
    """Greedy answers to `questions` after their `contexts`, compressed once (kvpress's protocol).

    Per document: `generated_ids` (the first token is the argmax after the question's last token,
    kept even if it ends the sequence, as kvpress keeps it; a later end-of-sequence token ends the
    answer and is not kept), `n_generated`, the KV counts at the end (`kv_kept`,
    `kv_total` over context, question and answer; the compressible ones over [sinks, n - W) of
    what was decided) and `evicted_per_layer`.

    `compact`: what the context's decision evicts is freed
    (`kvsweep.engine.compaction`), so the question and the answer read only what is kept; the same
    results as the masked cache (`compact=False`) up to float rounding. `prefill_batch` (with `compact`):
    the contexts' passes run for so many documents at a time, each group compacted before the
    next, so that one group's whole cache is the most held at once. `stats` (a dict) gets the bytes
    of the cache the answer is decoded over (`kv_cache_bytes`) and the decoding's `decode_seconds`
    and `decode_tokens` (`kvsweep.engine.generate.DecodeTiming`)."""
    if any(len(q) == 0 for q in questions) or any(len(c) == 0 for c in contexts):
        raise ValueError("every context and every question needs at least one token")
    if decoding and press is not None and press.fixed_ratio is not None:
        raise ValueError("a fixed ratio (kvpress's compression_ratio) compresses the context once: no decoding")
    device = model.device
    batch = len(contexts)
    press = press if press is not None else StreamingThresholdPress.mask_only()
    rows = torch.arange(batch, device=device)
    answers = GreedyAnswers(batch, max_new_tokens, eos_token_ids, device, keep_first=True)
    timing = DecodeTiming(device)
    with _prefilled(
        model, press, contexts, questions, max_new_tokens, decoding, compact, prefill_batch, cuda_graphs, clock
    ) as prefilled:
        passes, layout, count = prefilled.passes, prefilled.layout, prefilled.count
        last = torch.tensor([len(q) - 1 for q in questions], device=device)
        next_logits = prefilled.follow[rows, last]
        n_context = torch.tensor([len(c) for c in contexts], device=device)
        for step in range(max_new_tokens):
            token, writing, done = answers.take(next_logits, step)
            if done:
                break
            slot = prefilled.answer_slot + step
            layout.position[:, slot] = torch.where(writing, count, -1)
            after = torch.where(writing, count + 1, count)
            layout.read(count if decoding else n_context, after if decoding else n_context)
            next_logits = passes.run(token[:, None], count[:, None], slot)[:, 0].float().to(device)
            count = after
            if step == 0:
                timing.first_step_done(answers)
        counts, per_layer = prefilled.kv_counts(press)
        timing.into(stats, answers, passes)
    return [
        {**answer, **counts[row], "evicted_per_layer": per_layer[row]} for row, answer in enumerate(answers.results())
    ]


@torch.inference_mode()
def compress_once_nll(
    model,
    contexts: list[list[int]],
    continuations: list[list[int]],
    press: StreamingThresholdPress | None = None,
    cuda_graphs: bool | None = None,
    clock=None,
    compact: bool = True,
    prefill_batch: int | None = None,
    stats: dict | None = None,
) -> list[dict]:
    """The loss of each continuation after its context, compressed once: one pass over the
    context, the press decides, then one pass over the continuation (nothing more evicted).
    The first continuation token is predicted from the context's last position.

    Per document: `n_tokens` (context and continuation), `nll_sum` over the continuation's tokens,
    `n_predicted` (its length), the KV counts and `evicted_per_layer`. `compact` and
    `prefill_batch` as `compress_once_generate`'s; `stats` gets `kv_cache_bytes`, the bytes of the
    cache the continuation is scored over."""
    if any(len(c) == 0 for c in continuations) or any(len(c) == 0 for c in contexts):
        raise ValueError("every context and every continuation needs at least one token")
    device = model.device
    press = press if press is not None else StreamingThresholdPress.mask_only()
    # The continuation's pass reads its own tokens; the logits of its last token predict nothing.
    with _prefilled(
        model, press, contexts, continuations, 0, False, compact, prefill_batch, cuda_graphs, clock
    ) as prefilled:
        counts, per_layer = prefilled.kv_counts(press)
        if stats is not None:
            stats["kv_cache_bytes"] = prefilled.passes.kv_bytes()
    context_last, follow = prefilled.context_last, prefilled.follow
    nll = []
    for row, continuation in enumerate(continuations):
        # Token k of the continuation is predicted at the position before it: the context's last
        # position for k = 0, else continuation token k - 1.
        logits = torch.cat([context_last[row : row + 1], follow[row, : len(continuation) - 1]])
        target = torch.tensor(continuation, device=device)
        nll.append(float(F.cross_entropy(logits, target, reduction="sum")))
    return [
        {
            "n_tokens": len(c) + len(f),
            "nll_sum": nll[row],
            "n_predicted": len(f),
            **counts[row],
            "evicted_per_layer": per_layer[row],
        }
        for row, (c, f) in enumerate(zip(contexts, continuations, strict=True))
    ]
