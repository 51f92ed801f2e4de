"""RMSNorm in one Triton kernel, for the engine's passes on a GPU.

transformers' Llama-family RMSNorm (`LlamaRMSNorm.forward`: the input to float32, its squares'
mean, rsqrt, the product, back to the input's dtype, times the weight) runs as about seven kernels
with float32 round trips through memory, and Llama-3.1-8B has 65 norms a pass. In profiles of
exact streaming and decoding they were about a tenth of the GPU time (benchmarks/RESULTS.md).
Here each norm is one kernel that reads a row once and writes it once, with the same arithmetic
in float32. The mean's sum runs in another order than torch's reduction, so a result may differ
from the eager module's in the last bit of bf16, as a different GPU kernel would.

Only norms whose class has exactly `LlamaRMSNorm`'s forward are replaced (in transformers 5.2,
Qwen2/3, Mistral and about ninety others; Gemma's `1 + weight` and the like keep theirs), and
only on CUDA tensors of the weight's dtype; everything else, the CPU included, runs the module's
own forward. `fused_rms_norms(model)` is active while a press is (`StreamingThresholdPress`), so
eager passes and the CUDA graphs captured from them run the same kernels. A norm whose forward is
already replaced on the instance (accelerate's hook on the last norm of a model split over GPUs)
keeps it.
"""

import contextlib
import functools
import inspect

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kvsweep.kernel_launches import on_tensor_device, triton

if triton is not None:
    import triton.language as tl


@functools.cache
def has_llama_formula(cls: type) -> bool:
    """Whether `cls.forward` is, character for character, `LlamaRMSNorm.forward`."""
    try:
        return inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward)
    except (OSError, TypeError, AttributeError):
        return False


@contextlib.contextmanager
def fused_rms_norms(model: torch.nn.Module):
    """For the duration, the model's Llama-formula RMSNorms run `rms_norm` where it applies."""
    norms = [m for m in model.modules() if has_llama_formula(type(m)) and "forward" not in vars(m)]
    try:
        for norm in norms:
            norm.forward = functools.partial(_fused_forward, norm)
        yield
    finally:
        for norm in norms:
            vars(norm).pop("forward", None)


def _fused_forward(norm: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if applies(hidden_states, norm.weight):
        return rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    return type(norm).forward(norm, hidden_states)


def applies(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel runs on a GPU, for an input of the weight's dtype and device with rows of unit
    stride."""
    return (
        triton is not None
        and hidden_states.is_cuda
        and hidden_states.device == weight.device
        and hidden_states.dtype == weight.dtype
        and hidden_states.stride(-1) == 1
        and hidden_states.shape[-1] == weight.shape[0]
    )


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x's dtype), x in float32, over the last axis."""
    n = hidden_states.shape[-1]
    rows = hidden_states.reshape(-1, n)  # a view where the strides allow, else a copy; read as it is
    out = torch.empty(rows.shape, dtype=hidden_states.dtype, device=hidden_states.device)
    block = triton.next_power_of_2(n)
    rows_per_program = max(1, min(16, 4096 // block))  # short rows (per-head norms) several at once
    with on_tensor_device(hidden_states):
        _rms_norm[(triton.cdiv(rows.shape[0], rows_per_program),)](
            rows, *rows.stride(), weight, out, rows.shape[0], n, eps,
            BLOCK=block, ROWS=rows_per_program, num_warps=8 if block >= 4096 else 4,
        )  # fmt: skip
    return out.view(hidden_states.shape)


if triton is not None:

    @triton.jit
    def _rms_norm(X, sxm, sxn, W, Y, n_rows, n, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        ok = (rows[:, None] < n_rows) & (cols[None, :] < n)
        x = tl.load(X + rows[:, None] * sxm + cols[None, :] * sxn, mask=ok, other=0.0).to(tl.float32)
        variance = tl.sum(x * x, axis=1) / n
        normed = (x * tl.rsqrt(variance + eps)[:, None]).to(Y.dtype.element_ty)
        w = tl.load(W + cols, mask=cols < n, other=0.0)
        out = w[None, :].to(tl.float32) * normed.to(tl.float32)
        tl.store(Y + rows[:, None] * n + cols[None, :], out.to(Y.dtype.element_ty), mask=ok)
