"""One matrix product for a layer's q, k and v projections, one for its MLP's gate and up, and SiLU
times up in one kernel, for the engine's passes on a GPU.

In exact streaming and decoding a pass has a few rows (one token a document), so each projection
is a matrix-vector product whose time is reading its weights. Llama-3.1-8B's k and v projections
are 8 MB each: cuBLAS reads them at half the copy rate, and splits each of q, k and v over the
reduction with a kernel of its own to add the parts. On an H200 at batch 8 the three took 27 us a
layer (benchmarks/RESULTS.md, fifth step), where reading their 50 MB at the copy rate takes 12.
The MLP's SiLU and product were two kernels a layer, with a round trip of the gate through memory.

How: the weights of q, k and v (and of gate and up) are moved once into one tensor, the modules'
parameters becoming views of it: the same `Parameter` objects with the same values (ordinary
tensors, not inference tensors, so the model can still be trained), and no more memory than
before: one layer's weights more while it moves, and the old blocks go back to the driver.
Moving them again would leave CUDA graphs captured over the old addresses reading freed memory,
so the views are kept after the context ends, and a later context finds them already joined. The joined product rounds as one
cuBLAS call of another shape does: a result may differ from the three products' in the last bit
of bf16, as any other GPU kernel would. `silu_and_mul` is transformers' arithmetic to the bit
(SiLU in float32 with the accurate exp and a rounded division, rounded to the dtype, then the
product rounded), checked on the card (`benchmarks/checks.py`).

What is replaced, on GPUs only and while a press is active (`StreamingThresholdPress`, so eager
passes and the CUDA graphs captured from them run the same kernels):
- attentions whose forward is, character for character, `LlamaAttention.forward` as this module
  mirrors it (`MIRRORED_ATTENTION`, transformers 5.2); Qwen3's per-head norms, Mistral's sliding
  window and the like keep theirs;
- MLPs whose forward is `LlamaMLP.forward` (Qwen2/3, Mistral and others) with SiLU as activation;
- only where the projections are plain `nn.Linear`s on one GPU, of one dtype, with no hooks of
  their own, and all with or all without a bias. A module whose forward is already replaced on
  the instance (accelerate's hooks on a model split over GPUs) keeps it.
"""

import contextlib
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from kvsweep.forward_sources import same_forward, wrapped
from kvsweep.fused_rope import ROUNDED
from kvsweep.kernel_launches import on_tensor_device, triton

if triton is not None:
    import triton.language as tl
    from triton.language.extra import libdevice

    from kvsweep.fused_rope import rounded_as

# The sha256 of the `LlamaAttention.forward` source that `_attention_forward` mirrors (transformers
# 5.2). Another version's forward may do more than this copy: its attentions keep their own.
MIRRORED_ATTENTION = "39d28a8c881fdb5fe191a50b60a93f548819b408459e4517a9e3cda193031379"


def has_mirrored_attention(cls: type) -> bool:
    """Whether `cls.forward` is `LlamaAttention.forward`, and that is the source mirrored here."""
    return same_forward(cls, LlamaAttention, MIRRORED_ATTENTION)


def has_llama_mlp(cls: type) -> bool:
    return same_forward(cls, LlamaMLP)


def joinable(linears: list[nn.Module]) -> bool:
    """Plain linear layers with nothing of their own around their forward, on one GPU, of one dtype
    and input width, all with or all without a bias."""
    if not all(type(linear) is nn.Linear for linear in linears) or any(wrapped(m) for m in linears):
        return False
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    return (
        on_gpu(weights[0])
        and len({(w.device, w.dtype, w.shape[1]) for w in weights}) == 1
        and (all(b is None for b in biases) or all(b is not None and b.dtype == weights[0].dtype for b in biases))
    )


def on_gpu(weight: torch.Tensor) -> bool:
    """Where the joined products and the kernel run: CUDA tensors, with Triton installed."""
    return triton is not None and weight.is_cuda


@contextlib.contextmanager
def fused_projections(model: nn.Module):
    """For the duration, the model's Llama-formula attentions project q, k and v in one product, and
    its Llama-formula SiLU MLPs gate and up in one, followed by `silu_and_mul`."""
    replaced = []
    for module in model.modules():
        if "forward" in vars(module):
            continue
        if has_mirrored_attention(type(module)):
            projections = [module.q_proj, module.k_proj, module.v_proj]
            forward = _attention_forward
        elif has_llama_mlp(type(module)) and plain_silu(module.act_fn) and rounds(module):
            projections = [module.gate_proj, module.up_proj]
            forward = _mlp_forward
        else:
            continue
        if joinable(projections):
            module.forward = functools.partial(forward, module, *joined(projections))
            replaced.append(module)
    try:
        yield
    finally:
        for module in replaced:
            vars(module).pop("forward", None)


def plain_silu(act_fn: nn.Module) -> bool:
    """transformers' or torch's SiLU module, with nothing of its own around its forward."""
    return isinstance(act_fn, SiLUActivation | nn.SiLU) and not wrapped(act_fn)


def rounds(mlp: nn.Module) -> bool:
    """`silu_and_mul` rounds as torch does for bf16 and float32 (`fused_rope.ROUNDED`) only."""
    return mlp.gate_proj.weight.dtype in ROUNDED


def joined(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of `linears` as one (sum of outputs, inputs) tensor, rows in their
    order, of which each layer's parameters are views; moved there on the first call."""
    weight = _joined([linear.weight for linear in linears])
    bias = None if linears[0].bias is None else _joined([linear.bias for linear in linears])
    return weight, bias


def _joined(parameters: list[nn.Parameter]) -> torch.Tensor:
    if not adjacent(parameters):
        # Outside inference mode (the engine's passes run in it): parameters made of inference
        # tensors could never take part in a backward pass again.
        with torch.inference_mode(False):
            whole = torch.cat([p.detach() for p in parameters])
            start = 0
            for p in parameters:
                p.data = whole[start : start + p.shape[0]]
                start += p.shape[0]
        _release_cached(whole.device)
    first = parameters[0].detach()
    rows = sum(p.shape[0] for p in parameters)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _release_cached(device: torch.device) -> None:
    """The old weights' blocks, freed by the move, go back to the driver: PyTorch's allocator would
    keep them cached, and the joined tensors are larger than any of them, so they could not be
    reused for the next layer's (an 8B model would hold about 9 GB more while the press is active)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def adjacent(tensors: list[torch.Tensor]) -> bool:
    """Contiguous, in one storage, each starting where the one before ends."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        if t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def _attention_forward(
    module, qkv_weight, qkv_bias, hidden_states, position_embeddings=None, attention_mask=None,
    past_key_values=None, cache_position=None, **kwargs,
):  # fmt: skip
    """`LlamaAttention.forward` (transformers 5.2) with the three projections in one product. The
    rotary embedding, attention function and eager fallback are read from the module that defines
    the class's forward, as that forward reads them (so `kvsweep.fused_rope` still applies)."""
    if hidden_states.device != qkv_weight.device or hidden_states.dtype != qkv_weight.dtype:
        return type(module).forward(
            module, hidden_states, position_embeddings, attention_mask, past_key_values, cache_position, **kwargs
        )
    family = sys.modules[type(module).forward.__module__]  # where the mirrored forward reads them
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)

    sizes = [module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features]
    query, key, value = F.linear(hidden_states, qkv_weight, qkv_bias).split(sizes, dim=-1)
    query_states = query.view(hidden_shape).transpose(1, 2)
    key_states = key.view(hidden_shape).transpose(1, 2)
    value_states = value.view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = family.apply_rotary_pos_emb(query_states, key_states, cos, sin)

    if past_key_values is not None:
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        key_states, value_states = past_key_values.update(key_states, value_states, module.layer_idx, cache_kwargs)

    attention_interface = family.ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, family.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        module,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = module.o_proj(attn_output)
    return attn_output, attn_weights


def _mlp_forward(module, gate_up_weight, gate_up_bias, x):
    """`LlamaMLP.forward` with gate and up in one product and SiLU times up in one kernel."""
    if x.device != gate_up_weight.device or x.dtype != gate_up_weight.dtype:
        return type(module).forward(module, x)
    return module.down_proj(silu_and_mul(F.linear(x, gate_up_weight, gate_up_bias)))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last axis, as torch computes
    `act_fn(gate) * up` in the tensor's dtype: SiLU x / (1 + exp(-x)) in float32, rounded to the
    dtype; the product in float32, rounded."""
    n = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    with on_tensor_device(gate_up):
        _silu_and_mul[(rows.shape[0], triton.cdiv(n, block))](
            rows, rows.stride(0), out, n, BLOCK=block, LIBDEVICE_EXP=gate_up.is_cuda, num_warps=4,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out.view(*gate_up.shape[:-1], n)


if triton is not None:

    @triton.jit
    def _silu_and_mul(GU, stride_row, Y, n, BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        gate = tl.load(GU + row * stride_row + cols, mask=ok, other=0.0)
        up = tl.load(GU + row * stride_row + n + cols, mask=ok, other=0.0)
        x = gate.to(tl.float32)
        # torch's SiLU: x / (1 + exp(-x)), with CUDA's expf (libdevice's; `tl.exp` is the fast exp2
        # path) and an IEEE division. Triton's interpreter (the CPU tests) has no libdevice.
        if LIBDEVICE_EXP:
            e = libdevice.exp(-x)
        else:
            e = tl.exp(-x)
        act = rounded_as(tl.math.div_rn(x, 1.0 + e), gate.dtype)
        product = rounded_as(act * up.to(tl.float32), gate.dtype)
        tl.store(Y + row * n + cols, product.to(Y.dtype.element_ty), mask=ok)
