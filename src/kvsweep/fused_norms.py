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

The residual add before a layer's second norm joins it (`rms_norm(..., residual=...)`): decoder
layers whose forward is, character for character, `LlamaDecoderLayer.forward` as mirrored here
(`MIRRORED_DECODER_LAYER`; Qwen2/3 and Mistral share it) run `_decoder_layer_forward`, where one
kernel writes the sum, rounded to the dtype as torch's add rounds it, and its norm. That is one
kernel and one read of the sum less a layer: in exact streaming each is a few microseconds.
"""

import contextlib
import functools

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from kvsweep.forward_sources import hooked, same_forward
from kvsweep.fused_rope import ROUNDED
from kvsweep.kernel_launches import on_tensor_device, triton

if triton is not None:
    import triton.language as tl

    from kvsweep.fused_rope import rounded_as

# The sha256 of the `LlamaDecoderLayer.forward` source that `_decoder_layer_forward` mirrors
# (transformers 5.2). Layers of another forward keep theirs.
MIRRORED_DECODER_LAYER = "ba7de8a8e3828ffd3c7d94d62cdd47bc21fee6f34c01fa2b935a50e1df815d91"


def has_llama_formula(cls: type) -> bool:
    """Whether `cls.forward` is, character for character, `LlamaRMSNorm.forward`."""
    return same_forward(cls, LlamaRMSNorm)


def has_mirrored_decoder_layer(cls: type) -> bool:
    """Whether `cls.forward` is `LlamaDecoderLayer.forward`, and that is the source mirrored here."""
    return same_forward(cls, LlamaDecoderLayer, MIRRORED_DECODER_LAYER)


@contextlib.contextmanager
def fused_rms_norms(model: torch.nn.Module):
    """For the duration, the model's Llama-formula RMSNorms run `rms_norm` where it applies, and
    its Llama-formula decoder layers add the residual in their second norm's kernel."""
    norms = [m for m in model.modules() if has_llama_formula(type(m)) and "forward" not in vars(m)]
    layers = [
        m
        for m in model.modules()
        if has_mirrored_decoder_layer(type(m))
        and "forward" not in vars(m)
        and any(m.post_attention_layernorm is norm for norm in norms)
        and not hooked(m.post_attention_layernorm)
    ]
    try:
        for norm in norms:
            norm.forward = functools.partial(_fused_forward, norm)
        for layer in layers:
            layer.forward = functools.partial(_decoder_layer_forward, layer)
        yield
    finally:
        for module in norms + layers:
            vars(module).pop("forward", None)


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


def _decoder_layer_forward(
    layer, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
    cache_position=None, position_embeddings=None, **kwargs,
):  # fmt: skip
    """`LlamaDecoderLayer.forward` (transformers 5.2) with the residual add after attention and the
    second norm in one kernel where it applies."""
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    hidden_states, _ = layer.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        cache_position=cache_position,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    norm = layer.post_attention_layernorm
    if (
        applies(hidden_states, norm.weight)
        and residual.shape == hidden_states.shape
        and residual.dtype == norm.weight.dtype
        and norm.weight.dtype in ROUNDED  # the dtypes whose add the kernel rounds as torch does
    ):
        residual, hidden_states = rms_norm(hidden_states, norm.weight, norm.variance_epsilon, residual=residual)
    else:
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = norm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x's dtype), x in float32, over the last axis.

    With `residual` (of x's shape and dtype), x is first residual + x, rounded to the dtype as
    torch's add rounds it, and (that sum, its norm) are returned."""
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
