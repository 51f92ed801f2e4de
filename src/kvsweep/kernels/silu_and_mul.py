"""SiLU of a gate times its up projection, in one kernel (a Llama-family MLP's `act_fn(gate) * up`).

The MLP's SiLU and product were two kernels a layer, with a round trip of the gate through
memory. Here one kernel reads [gate | up] (the joined gate and up projection's output) and writes
the product, with transformers' arithmetic to the bit: SiLU x / (1 + exp(-x)) in float32 with the
accurate exp and a rounded division, rounded to the dtype, then the product rounded (checked on
the card, `benchmarks/checks.py`). Where a model's MLPs use it: `kvsweep.engine.integration`.
"""

import torch

from kvsweep.kernels.launches import launched, on_gpu, on_tensor_device, triton
from kvsweep.kernels.rounding import ROUNDED

if triton is not None:
    import triton.language as tl
    from triton.language.extra import libdevice

    from kvsweep.kernels.rounding import rounded_as


def supports(gate_up: torch.Tensor) -> bool:
    """On a GPU, where the kernel `fits`."""
    return on_gpu(gate_up) and fits(gate_up)


def fits(gate_up: torch.Tensor) -> bool:
    """[gate | up] along an even last axis, in a dtype whose rounding the kernel reproduces."""
    return gate_up.dtype in ROUNDED and gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last axis, as torch computes
    `act_fn(gate) * up` in the tensor's dtype: SiLU x / (1 + exp(-x)) in float32, rounded to the
    dtype; the product in float32, rounded."""
    launched("silu_and_mul")
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
