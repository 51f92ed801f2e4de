"""A pass's eviction decisions in one Triton kernel, for the press's hook on a GPU.

After each layer's pass, `StreamingThresholdPress` evicts the positions p that leave the window in
this pass (tokens_before - window <= p < tokens_after - window, past the sinks) and score below the
threshold. As torch operations on the slot range that can hold them that is about ten small
kernels per layer (comparisons, subtractions, logical ands, the in-place or); in a decoding step
each costs a few microseconds for a few hundred elements, and over 32 layers they were a large
part of what the methods cost beside the baseline (benchmarks/history/2026-11-28.md). Here it is one kernel
with the same arithmetic: integer comparisons, and float32 scores compared with the threshold as
a float32 number, as torch compares a float32 tensor with a python float.

H2O's score, the attention received over the number of queries that attended
(`H2OScorer.score`: received / max(tokens_after - position, 1)), is folded in: computed in the
kernel from the sums (`mean_over_queries`), with the same float32 division (rounded to nearest),
where as torch operations it was a few kernels a layer more.
"""

import torch

from kvsweep.kernels.launches import launched, on_gpu, on_tensor_device, triton

if triton is not None:
    import triton.language as tl

BLOCK = 256


def supports(evicted: torch.Tensor, scores: torch.Tensor) -> bool:
    """On a GPU, where the kernel `fits`."""
    return on_gpu(evicted) and fits(evicted, scores)


def fits(evicted: torch.Tensor, scores: torch.Tensor) -> bool:
    """Float32 scores of the slots' shape, on their device (scores of another dtype would be
    compared in that dtype)."""
    return scores.device == evicted.device and scores.dtype == torch.float32 and scores.shape == evicted.shape


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
    launched("decisions")
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
