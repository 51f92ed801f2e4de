"""A pass's eviction decisions in one Triton kernel, for the press's hook on a GPU.

After each layer's pass, `StreamingThresholdPress` evicts the positions p that leave the window in
this pass (tokens_before - window <= p < tokens_after - window, past the sinks) and score below the
threshold. As torch operations on the slot range that can hold them that is about ten small
kernels per layer (comparisons, subtractions, logical ands, the in-place or); in a decoding step
each costs a few microseconds for a few hundred elements, and over 32 layers they were a large
part of what the methods cost beside the baseline (benchmarks/RESULTS.md). Here it is one kernel
with the same arithmetic: integer comparisons, and float32 scores compared with the threshold as
a float32 number, as torch compares a float32 tensor with a python float.
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


def evict_decided(evicted, scores, position, tokens_before, tokens_after, sinks: int, window: int, threshold: float):
    """evicted |= deciding & (scores < threshold), in place, where deciding[b, n] = position >= sinks
    and tokens_before[b] - window <= position < tokens_after[b] - window. evicted (batch, kv_heads,
    n) bool and scores (batch, kv_heads, n): views of the layer's state over a slot range;
    position (batch, n) long over the same range; tokens_before and tokens_after (batch,) long,
    contiguous (the layout's); all on the GPU of `evicted`."""
    batch, kv_heads, n = evicted.shape
    if tokens_before.stride(0) != 1 or tokens_after.stride(0) != 1:
        raise ValueError("the token counts must be contiguous")
    flags = evicted.view(torch.uint8)
    with on_tensor_device(evicted):
        _evict_decided[(batch * kv_heads, triton.cdiv(n, BLOCK))](
            flags, *flags.stride(), scores, *scores.stride(), position, *position.stride(),
            tokens_before, tokens_after, n, kv_heads, sinks, window, float(threshold), BLOCK=BLOCK,
        )  # fmt: skip


if triton is not None:

    @triton.jit
    def _evict_decided(
        E, seb, seh, sen, S, ssb, ssh, ssn, P, spb, spn, TB, TA, n, kv_heads, sinks, window, threshold,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        b, h = bh // kv_heads, bh % kv_heads
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        position = tl.load(P + b * spb + cols * spn, mask=ok, other=-1)
        deciding = (position >= sinks) & (position >= tl.load(TB + b) - window) & (position < tl.load(TA + b) - window)
        score = tl.load(S + b * ssb + h * ssh + cols * ssn, mask=ok, other=0.0)
        flags = E + b * seb + h * seh + cols * sen
        evicted = tl.load(flags, mask=ok, other=0) != 0
        tl.store(flags, (evicted | (deciding & (score < threshold))).to(tl.uint8), mask=ok)
