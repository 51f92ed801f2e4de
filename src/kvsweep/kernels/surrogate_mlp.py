"""KVzap's 2-layer MLP surrogate on a pass of a few tokens, in two Triton kernels that write its
scores straight into the layer's float32 entry scores.

In exact streaming and decoding a pass has one token a document. torch runs the surrogate
(Linear, GELU, Linear) as a matrix-vector product that cuBLAS splits over the reduction, the
kernel that adds the parts, the GELU, the second product, and then the store of the scores: five
kernels, about 13 us a layer on an H200 at batch 8 for 4 MB of weights
(benchmarks/results/h200_llama-3.1-8b_2026-11-28_profile_chunk1_b8_all_methods.txt). Here:
- `_first_layer_parts`: the first layer's products, split over the hidden units and the input
  width into enough programs to read the weights at the copy rate; float32 parts;
- `_surrogate_tail`: per token, the parts added in a fixed order, the bias, the GELU, the second
  layer and its bias, each rounded to the model's dtype where torch's bf16 modules round, and the
  score stored as float32 at the token's slot.
The parts are added in another order than cuBLAS adds them, so a hidden unit may differ from
torch's in the last bit of bf16, and a score by as much as that moves it (the card's checks compare
the decisions, `benchmarks/checks.py`). Passes of more tokens (chunks) keep torch's modules, whose
products use the GPU well there.
"""

import torch
from torch import nn

from kvsweep.kernels.launches import launched, on_gpu, on_tensor_device, triton
from kvsweep.kernels.rounding import ROUNDED

if triton is not None:
    import triton.language as tl

    from kvsweep.kernels.rounding import rounded_as

# Tokens a pass may have for the kernels (rows of one tl.dot block; exact streaming and decoding
# at batch <= 16).
MAX_ROWS = 16
BLOCK_HIDDEN = 64  # hidden units a program of the first layer computes
BLOCK_INPUT = 256  # input width a program of the first layer reads


def supports(mlp: nn.Module, hidden_states: torch.Tensor, entry_scores: torch.Tensor, query_slots) -> bool:
    """On a GPU, where the kernels `fit`."""
    return on_gpu(hidden_states) and fits(mlp, hidden_states, entry_scores, query_slots)


def fits(mlp: nn.Module, hidden_states: torch.Tensor, entry_scores: torch.Tensor, query_slots) -> bool:
    """A (Linear, exact GELU, Linear) surrogate of the hidden states' dtype (bf16 or float32) and
    device, a pass of at most `MAX_ROWS` tokens with one integer slot each, and a float32 state, all
    on one device."""
    if hidden_states.dim() != 3 or not (isinstance(mlp, nn.Sequential) and len(mlp) == 3):
        return False
    if query_slots.dim() != 1 or query_slots.numel() != hidden_states.shape[1] or query_slots.is_floating_point():
        return False
    first, gelu, second = mlp
    if not (type(first) is nn.Linear and type(gelu) is nn.GELU and type(second) is nn.Linear):
        return False
    parameters = [p for p in (first.weight, first.bias, second.weight, second.bias) if p is not None]
    return (
        gelu.approximate == "none"
        and hidden_states.dtype in ROUNDED
        and all(p.device == hidden_states.device and p.dtype == hidden_states.dtype for p in parameters)
        and hidden_states.shape[0] * hidden_states.shape[1] <= MAX_ROWS
        and hidden_states.shape[2] == first.in_features
        and entry_scores.dtype == torch.float32
        and entry_scores.device == hidden_states.device == query_slots.device
        and entry_scores.shape[:2] == (hidden_states.shape[0], second.out_features)
    )


def score_into(entry_scores: torch.Tensor, hidden_states: torch.Tensor, mlp: nn.Sequential, query_slots) -> None:
    """entry_scores[b, h, query_slots[i]] = float32(mlp(hidden_states)[b, i, h]), in place. Only where
    `supports` holds."""
    launched("surrogate_mlp")
    first, _, second = mlp
    batch, q_len, width = hidden_states.shape
    rows, n_hidden, n_out = batch * q_len, first.out_features, second.out_features
    splits = triton.cdiv(width, BLOCK_INPUT)
    parts = torch.empty(splits, MAX_ROWS, n_hidden, dtype=torch.float32, device=hidden_states.device)
    # float32 products exact, not TF32. Triton's interpreter (the CPU tests) multiplies bf16 blocks
    # wrongly: there they are widened to float32 first (exact products of bf16 either way).
    widen = not hidden_states.is_cuda
    precision = "ieee" if hidden_states.dtype == torch.float32 or widen else "tf32"
    with on_tensor_device(hidden_states):
        _first_layer_parts[(triton.cdiv(n_hidden, BLOCK_HIDDEN), splits)](
            hidden_states, *hidden_states.stride(), first.weight, *first.weight.stride(), parts, rows, q_len,
            n_hidden, width, ROWS=MAX_ROWS, BLOCK_N=BLOCK_HIDDEN, BLOCK_K=BLOCK_INPUT, PRECISION=precision, WIDEN=widen,
        )  # fmt: skip
        _surrogate_tail[(rows,)](
            parts, first.bias, second.weight, *second.weight.stride(), second.bias, entry_scores,
            *entry_scores.stride(), query_slots, query_slots.stride(0), q_len, n_hidden, n_out, splits,
            ROWS=MAX_ROWS, BLOCK_H=triton.next_power_of_2(n_hidden), BLOCK_O=triton.next_power_of_2(n_out),
            HAS_BIAS1=first.bias is not None, HAS_BIAS2=second.bias is not None, DTYPE=_tl_dtype(hidden_states.dtype),
            enable_fp_fusion=False,
        )  # fmt: skip


def _tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


if triton is not None:

    @triton.jit
    def _first_layer_parts(
        X, sxb, sxq, sxk, W, swn, swk, P, n_rows, q_len, n_hidden, width,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        WIDEN: tl.constexpr,
    ):  # fmt: skip
        """parts[k block, row, n] = the products of one block of the input width, float32."""
        rows = tl.arange(0, ROWS)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok, col_ok, k_ok = rows < n_rows, cols < n_hidden, ks < width
        b, i = rows // q_len, rows % q_len
        x = tl.load(
            X + b[:, None] * sxb + i[:, None] * sxq + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(W + cols[:, None] * swn + ks[None, :] * swk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if WIDEN:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), input_precision=PRECISION)
        out = P + tl.program_id(1) * ROWS * n_hidden + rows[:, None] * n_hidden + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _surrogate_tail(
        P, B1, W2, sw2o, sw2i, B2, ES, seb, seh, sen, QS, sqs, q_len, n_hidden, n_out, splits,
        ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr, HAS_BIAS1: tl.constexpr,
        HAS_BIAS2: tl.constexpr, DTYPE: tl.constexpr,
    ):  # fmt: skip
        """One token: hidden = round(sum of parts + b1); gelu = round(h * 0.5 * (1 + erf(h / sqrt 2)));
        score = round(W2 gelu + b2), stored as float32 at the token's slot for every output head."""
        row = tl.program_id(0)
        hs = tl.arange(0, BLOCK_H)
        h_ok = hs < n_hidden
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for s in range(splits):  # a fixed order: a graph replay gives the eager pass's scores
            acc += tl.load(P + s * ROWS * n_hidden + row * n_hidden + hs, mask=h_ok, other=0.0)
        if HAS_BIAS1:
            acc += tl.load(B1 + hs, mask=h_ok, other=0.0).to(tl.float32)
        h = rounded_as(acc, DTYPE)
        # torch's exact GELU: x * 0.5 * (1 + erf(x * M_SQRT1_2)) in float32.
        gelu = rounded_as(h * 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)), DTYPE)
        outs = tl.arange(0, BLOCK_O)
        o_ok = outs < n_out
        w2 = tl.load(W2 + outs[:, None] * sw2o + hs[None, :] * sw2i, mask=o_ok[:, None] & h_ok[None, :], other=0.0)
        score = tl.sum(w2.to(tl.float32) * gelu[None, :], axis=1)
        if HAS_BIAS2:
            score += tl.load(B2 + outs, mask=o_ok, other=0.0).to(tl.float32)
        score = rounded_as(score, DTYPE)
        b, i = row // q_len, row % q_len
        slot = tl.load(QS + i * sqs)
        tl.store(ES + b * seb + outs * seh + slot * sen, score, mask=o_ok)
