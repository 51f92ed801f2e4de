"""Rounding as torch rounds, inside Triton kernels: a float32 value rounded to bf16 (to nearest,
ties to even) on its bits, for kernels whose results must equal torch's eager ops to the bit."""

import torch

from kvsweep.kernels.launches import triton

if triton is not None:
    import triton.language as tl

# The dtypes whose rounding the kernels reproduce (float32 needs none).
ROUNDED = (torch.bfloat16, torch.float32)


if triton is not None:

    @triton.jit
    def rounded_as(x, dtype: tl.constexpr):
        """float32 x rounded to bf16 (to nearest, ties to even), kept as float32; float32 as it is.

        Written on the bits: with casts to bf16 and back instead, 16% of the results on an H200 were
        one bf16 step off the eager ones, as if the products had not been rounded."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        return x
