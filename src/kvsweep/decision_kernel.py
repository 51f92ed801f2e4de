"""A pass's eviction decisions in one Triton kernel, for the press's hook on a GPU.

After each layer's pass, `StreamingThresholdPress` evicts the positions p that leave the window in
this pass (tokens_before - window <= p < tokens_after - window, past the sinks) and score below the
threshold. As torch operations on the slot range that can hold them that is about ten small
kernels per layer (comparisons, subtractions, logical ands, the in-place or); in a decoding step
each costs a few microseconds for a few hundred elements, and over 32 layers they were a large
part of what the methods cost beside the baseline (benchmarks/RESULTS.md). Here it is one kernel
with the same arithmetic: integer comparisons, and float32 scores compared with the threshold as
a float32 number, as torch compares a float32 tensor with a python float.

Two more steps of the hook are folded in, each a few kernels a layer as torch operations:
- H2O's score, the attention received over the number of queries that attended
  (`H2OScorer.score`: received / max(tokens_after - position, 1)), is computed in the decision
  kernel from the sums (`mean_over_queries`), with the same float32 division (rounded to nearest);
- a pass's entry scores (KVzap's surrogate, in the model's dtype) are written into the float32
  state at the pass's query slots by `store_entry_scores`, in one kernel instead of a conversion
  and an `index_copy_`.
"""

import torch

from kvsweep.kernel_launches import on_tensor_device, triton

if triton is not None:
    import triton.language as tl

BLOCK = 256


def applies(evicted: torch.Tensor, scores: torch.Tensor) -> bool:
    """On a GPU, for float32 scores of the slots' shape (scores of another dtype would be compared
    in that dtype)."""
    return (
        triton is not None
        and evicted.is_cuda
        and scores.device == evicted.device
        and scores.dtype == torch.float32
        and scores.shape == evicted.shape
    )


def stores(entry_scores: torch.Tensor, new_scores: torch.Tensor, query_slots: torch.Tensor) -> bool:
    """Whether `store_entry_scores` writes these: a float32 state, floating scores of its batch and
    heads with one per query slot, all on one GPU (else `index_copy_`, which checks the rest)."""
    return (
        triton is not None
        and entry_scores.is_cuda
        and new_scores.device == entry_scores.device == query_slots.device
        and entry_scores.dtype == torch.float32
        and new_scores.is_floating_point()
        and new_scores.dim() == 3
        and new_scores.shape[:2] == entry_scores.shape[:2]
        and new_scores.shape[2] == query_slots.numel()
    )


def evict_decided(
    evicted, scores, position, tokens_before, tokens_after, sinks: int, window: int, threshold: float,
    mean_over_queries: bool = False,
):  # fmt: skip
    """evicted |= deciding & (scores < threshold), in place, where deciding[b, n] = position >= sinks
    and tokens_before[b] - window <= position < tokens_after[b] - window. evicted (batch, kv_heads,
    n) bool and scores (batch, kv_heads, n): views of the layer's state over a slot range;
    position (batch, n) long over the same range; tokens_before and tokens_after (batch,) long,
    contiguous (the layout's); all on the GPU of `evicted`. With `mean_over_queries`, `scores` holds
    attention sums and the score compared is H2O's: scores / max(tokens_after[b] - position, 1)."""
    batch, kv_heads, n = evicted.shape
    if tokens_before.stride(0) != 1 or tokens_after.stride(0) != 1:
        raise ValueError("the token counts must be contiguous")
    flags = evicted.view(torch.uint8)
    with on_tensor_device(evicted):
        _evict_decided[(batch * kv_heads, triton.cdiv(n, BLOCK))](
            flags, *flags.stride(), scores, *scores.stride(), position, *position.stride(),
            tokens_before, tokens_after, n, kv_heads, sinks, window, float(threshold), BLOCK=BLOCK,
            MEAN=mean_over_queries,
        )  # fmt: skip


def store_entry_scores(entry_scores: torch.Tensor, new_scores: torch.Tensor, query_slots: torch.Tensor) -> None:
    """entry_scores[b, h, query_slots[i]] = float32(new_scores[b, h, i]), in place (what
    `entry_scores.index_copy_(2, query_slots, new_scores.float())` does). entry_scores (batch,
    kv_heads, capacity) float32; new_scores (batch, kv_heads, q), any float dtype and strides;
    query_slots (q,) long; all on one GPU (`stores`)."""
    batch, kv_heads, q_len = new_scores.shape
    with on_tensor_device(entry_scores):
        _store_entry_scores[(batch * kv_heads, triton.cdiv(q_len, BLOCK))](
            entry_scores, *entry_scores.stride(), new_scores, *new_scores.stride(), query_slots, query_slots.stride(0),
            q_len, kv_heads, BLOCK=BLOCK,
        )  # fmt: skip


if triton is not None:

    @triton.jit
    def _evict_decided(
        E, seb, seh, sen, S, ssb, ssh, ssn, P, spb, spn, TB, TA, n, kv_heads, sinks, window, threshold,
        BLOCK: tl.constexpr, MEAN: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        b, h = bh // kv_heads, bh % kv_heads
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        position = tl.load(P + b * spb + cols * spn, mask=ok, other=-1)
        tokens_after = tl.load(TA + b)
        deciding = (position >= sinks) & (position >= tl.load(TB + b) - window) & (position < tokens_after - window)
        score = tl.load(S + b * ssb + h * ssh + cols * ssn, mask=ok, other=0.0)
        if MEAN:  # H2O: the queries that attended to the key, as float32, and a division rounded to nearest
            n_queries = tl.maximum(tokens_after - position, 1).to(tl.float32)
            score = tl.math.div_rn(score, n_queries)
        flags = E + b * seb + h * seh + cols * sen
        evicted = tl.load(flags, mask=ok, other=0) != 0
        tl.store(flags, (evicted | (deciding & (score < threshold))).to(tl.uint8), mask=ok)

    @triton.jit
    def _store_entry_scores(ES, seb, seh, sen, NS, snb, snh, snq, QS, sqs, q_len, kv_heads, BLOCK: tl.constexpr):
        """One block of a (document, KV head)'s new scores, as float32, into their query slots."""
        bh = tl.program_id(0)
        b, h = bh // kv_heads, bh % kv_heads
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = i < q_len
        slot = tl.load(QS + i * sqs, mask=ok, other=0)
        score = tl.load(NS + b * snb + h * snh + i * snq, mask=ok, other=0.0)
        tl.store(ES + b * seb + h * seh + slot * sen, score.to(tl.float32), mask=ok)
