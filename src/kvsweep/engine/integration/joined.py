"""Linear layers joined into one: the weights of a layer's q, k and v projections (or its MLP's
gate and up) moved once into one tensor, so that one matrix product computes them all.

In exact streaming and decoding a pass has a few rows (one token a document), so each projection
is a matrix-vector product whose time is reading its weights. Llama-3.1-8B's k and v projections
are 8 MB each: cuBLAS reads them at half the copy rate, and splits each of q, k and v over the
reduction with a kernel of its own to add the parts; on an H200 at batch 8 the three took 27 us a
layer where reading their 50 MB at the copy rate takes 12
(benchmarks/results/h200_llama-3.1-8b_2026-11-28_joined_layers_chunk1.json).

The modules' parameters become views of the joined tensor: the same `Parameter` objects with the
same values (ordinary tensors, not inference tensors, so the model can still be trained), and no
more memory than before: one layer's weights more while it moves, and the old blocks go back to
the driver. Moving them again would leave CUDA graphs captured over the old addresses reading
freed memory, so the views are kept after a press ends, and a later press finds them already
joined. The joined product rounds as one cuBLAS call of another shape does: a result may differ
from the separate products' in the last bit of bf16, as any other GPU kernel would.
"""

import torch
from torch import nn
from transformers.activations import SiLUActivation

from kvsweep.engine.integration.hooks import wrapped
from kvsweep.kernels.launches import on_gpu
from kvsweep.kernels.rounding import ROUNDED


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


def plain_silu(act_fn: nn.Module) -> bool:
    """transformers' or torch's SiLU module, with nothing of its own around its forward."""
    return isinstance(act_fn, SiLUActivation | nn.SiLU) and not wrapped(act_fn)


def rounds(mlp: nn.Module) -> bool:
    """`silu_and_mul` rounds as torch does for bf16 and float32 (`kvsweep.kernels.rounding.ROUNDED`) only."""
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
