"""RMSNorm in one Triton kernel, with the residual add before it when asked.

transformers' Llama-family RMSNorm (`LlamaRMSNorm.forward`: the input to float32, its squares'
mean, rsqrt, the product, back to the input's dtype, times the weight) runs as about seven kernels
with float32 round trips through memory, and Llama-3.1-8B has 65 norms a pass. In profiles of
exact streaming and decoding they were about a tenth of the GPU time
(benchmarks/history/2026-11-28.md). Here each norm is one kernel that reads a row once and writes
it once, with the same arithmetic in float32. The mean's sum runs in another order than torch's
reduction, so a result may differ from the eager module's in the last bit of bf16, as a different
GPU kernel would. With `residual`, the kernel first writes residual + x, rounded to the dtype as
torch's add rounds it (the add before a decoder layer's second norm): one kernel and one read of
the sum less a layer. Where a model's norms are replaced by it: `kvsweep.engine.integration`.
"""

import torch

from kvsweep.kernels.launches import launched, on_gpu, on_tensor_device, triton
from kvsweep.kernels.rounding import ROUNDED

if triton is not None:
    import triton.language as tl

    from kvsweep.kernels.rounding import rounded_as


def supports(hidden_states: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """On a GPU, where the kernel `fits`."""
    return on_gpu(hidden_states) and fits(hidden_states, weight, residual)


def fits(hidden_states: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """An input of the weight's dtype and device with rows of unit stride and the weight's width;
    with `residual`, of the input's shape and dtype, in a dtype whose add the kernel rounds as
    torch does (`ROUNDED`)."""
    return (
        hidden_states.device == weight.device
        and hidden_states.dtype == weight.dtype
        and hidden_states.stride(-1) == 1
        and hidden_states.shape[-1] == weight.shape[0]
        and (
            residual is None
            or (residual.shape == hidden_states.shape and residual.dtype == weight.dtype and weight.dtype in ROUNDED)
        )
    )


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x's dtype), x in float32, over the last axis.

    With `residual` (of x's shape and dtype), x is first residual + x, rounded to the dtype as
    torch's add rounds it, and (that sum, its norm) are returned."""
    launched("rms_norm")
    n = hidden_states.shape[-1]
    rows = hidden_states.reshape(-1, n)  # a view where the strides allow, else a copy; read as it is
    out = torch.empty(rows.shape, dtype=hidden_states.dtype, device=hidden_states.device)
    added = rows if residual is None else residual.reshape(-1, n)
    total = out if residual is None else torch.empty_like(out)
    block = triton.next_power_of_2(n)
    rows_per_program = max(1, min(16, 4096 // block))  # short rows (per-head norms) several at once
    with on_tensor_device(hidden_states):
        _rms_norm[(triton.cdiv(rows.shape[0], rows_per_program),)](
            rows, *rows.stride(), added, *added.stride(), total, weight, out, rows.shape[0], n, eps,
            BLOCK=block, ROWS=rows_per_program, ADD=residual is not None, num_warps=8 if block >= 4096 else 4,
            enable_fp_fusion=False,
        )  # fmt: skip
    if residual is None:
        return out.view(hidden_states.shape)
    return total.view(hidden_states.shape), out.view(hidden_states.shape)


if triton is not None:

    @triton.jit
    def _rms_norm(
        X, sxm, sxn, R, srm, srn, S, W, Y, n_rows, n, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr, ADD: tl.constexpr
    ):  # fmt: skip
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        ok = (rows[:, None] < n_rows) & (cols[None, :] < n)
        x = tl.load(X + rows[:, None] * sxm + cols[None, :] * sxn, mask=ok, other=0.0).to(tl.float32)
        if ADD:  # residual + x, rounded as torch rounds the add, written out, then normed
            r = tl.load(R + rows[:, None] * srm + cols[None, :] * srn, mask=ok, other=0.0).to(tl.float32)
            x = rounded_as(r + x, Y.dtype.element_ty)
            tl.store(S + rows[:, None] * n + cols[None, :], x.to(S.dtype.element_ty), mask=ok)
        variance = tl.sum(x * x, axis=1) / n
        normed = (x * tl.rsqrt(variance + eps)[:, None]).to(Y.dtype.element_ty)
        w = tl.load(W + cols, mask=cols < n, other=0.0)
        out = w[None, :].to(tl.float32) * normed.to(tl.float32)
        tl.store(Y + rows[:, None] * n + cols[None, :], out.to(Y.dtype.element_ty), mask=ok)
