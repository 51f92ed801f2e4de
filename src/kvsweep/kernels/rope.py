"""Rotary position embedding in one Triton kernel per tensor.

transformers' `apply_rotary_pos_emb` (Llama family) computes q * cos + rotate_half(q) * sin, the
same for k, as about ten kernels a layer (two slices, a negation, a concatenation, four products,
two sums), each a round trip through memory. Here one kernel rotates all heads of a tensor, with
the same operations in the same order: each product and the sum rounded as torch rounds them (to bf16
on the bits; float32 without fused multiply-adds), so the result is the eager one, bit for bit
(bf16 checked on the card, `benchmarks/checks.py`). Where a model's RoPE is replaced by it:
`kvsweep.engine.integration`.
"""

import torch

from kvsweep.kernels.launches import launched, on_gpu, on_tensor_device, triton
from kvsweep.kernels.rounding import ROUNDED

if triton is not None:
    import triton.language as tl

    from kvsweep.kernels.rounding import rounded_as


def supports(q, k, cos, sin, unsqueeze_dim=1) -> bool:
    """On a GPU (all four tensors on one), in the shapes the kernel takes (`fits`)."""
    return on_gpu(q) and fits(q, k, cos, sin, unsqueeze_dim)


def fits(q, k, cos, sin, unsqueeze_dim=1) -> bool:
    """All four on one device and of one dtype of `ROUNDED`; q and k (batch, heads, seq, d), cos and
    sin (batch, seq, d), with d / 2 a power of two (the kernel's block over each half); cos
    unsqueezed at axis 1."""
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4:
        return False
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        return False
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1 or q.dtype not in ROUNDED:
        return False
    batch, _, seq, d = q.shape
    half = d // 2
    if d % 2 or half & (half - 1):
        return False
    return cos.shape == sin.shape == (batch, seq, d) and k.shape[0] == batch and k.shape[2:] == (seq, d)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (batch, heads, seq, d) and cos, sin (batch, seq, d),
    each product and the sum rounded to x's dtype. The result is laid out (batch, seq, heads, d) in
    memory (the projection's layout, as torch's elementwise result of the transposed view is) and
    returned as a (batch, heads, seq, d) view."""
    launched("rope")
    batch, heads, seq, d = x.shape
    out = torch.empty(batch, seq, heads, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    # Heads a program rotates: up to 4,096 elements, a power of two.
    block_heads = min(triton.next_power_of_2(heads), 1 << max(0, (4096 // d).bit_length() - 1))
    with on_tensor_device(x):
        # No fused multiply-adds: float32 rounds each product and the sum, as torch's eager ops do.
        _rotate[(batch * seq, triton.cdiv(heads, block_heads))](
            x, *x.stride(), cos, *cos.stride(), sin, *sin.stride(), out, *out.stride(), seq, heads,
            HALF=d // 2, BLOCK_HEADS=block_heads, enable_fp_fusion=False,
        )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _rotate(
        X, sxb, sxh, sxs, sxd, C, scb, scs, scd, S, ssb, sss, ssd, Y, syb, syh, sys_, syd, seq, heads,
        HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    ):  # fmt: skip
        """One token's heads [h0, h0 + BLOCK_HEADS): first half x1 * cos1 - x2 * sin1, second
        half x2 * cos2 + x1 * sin2 (rotate_half is (-x2, x1))."""
        b, s = tl.program_id(0) // seq, tl.program_id(0) % seq
        h = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        j = tl.arange(0, HALF)
        ok = h[:, None] < heads
        row = X + b * sxb + s * sxs + h[:, None] * sxh
        x1 = tl.load(row + j[None, :] * sxd, mask=ok, other=0.0)
        x2 = tl.load(row + (j[None, :] + HALF) * sxd, mask=ok, other=0.0)
        c1 = tl.load(C + b * scb + s * scs + j * scd)[None, :]
        c2 = tl.load(C + b * scb + s * scs + (j + HALF) * scd)[None, :]
        s1 = tl.load(S + b * ssb + s * sss + j * ssd)[None, :]
        s2 = tl.load(S + b * ssb + s * sss + (j + HALF) * ssd)[None, :]
        # (-x2) * sin1 rounded is -(x2 * sin1) rounded: rounding to nearest even is symmetric.
        first = _rounded_sum(_rounded_product(x1, c1), -_rounded_product(x2, s1), x1.dtype).to(x1.dtype)
        second = _rounded_sum(_rounded_product(x2, c2), _rounded_product(x1, s2), x1.dtype).to(x1.dtype)
        out = Y + b * syb + s * sys_ + h[:, None] * syh
        tl.store(out + j[None, :] * syd, first, mask=ok)
        tl.store(out + (j[None, :] + HALF) * syd, second, mask=ok)

    @triton.jit
    def _rounded_product(a, b):
        """a * b in float32, rounded as torch rounds a product of a's dtype."""
        return rounded_as(a.to(tl.float32) * b.to(tl.float32), a.dtype)

    @triton.jit
    def _rounded_sum(a, b, dtype: tl.constexpr):
        return rounded_as(a + b, dtype)
