"""H2O's attention in two Triton kernels: output and column sums, without writing the matrix.

H2O (Zhang et al. 2023, https://arxiv.org/abs/2306.14048) scores a cached key by the attention
probability it has received. Computed with torch ops, a pass writes and reads the whole
(batch, kv_heads, query rows, keys) probability matrix several times (scores, mask, softmax, the
weighted column sum); at chunk 128 with a batch of 8 this costs a quarter of the model's time.
Here nothing of that size is written:

1. `_attention_forward` (FlashAttention's forward pass): one program per block of query rows
   streams over the keys with a running maximum and sum (online softmax) and gives the attention
   output and each row's log-sum-exp of its visible scores.
2. `_column_sums` (as FlashAttention's backward pass walks keys): one program per block of keys
   streams over all query rows, recomputes the scores, and sums exp(score - logsumexp) * row weight
   over the rows. Each key's sum is made by one program in a fixed order: no atomics, the same
   result on every run (a CUDA graph replay equals the eager pass).

The mask is read once per KV head and shared by its query heads (never expanded), and keys past
the pass's last query are skipped. Query heads of a KV group are folded into the rows as in
`kvsweep.attention` (row = group * q_len + query). Scores, sums and the output are accumulated in
float32 (scores in base 2: exp2 is the hardware's exponential).

The kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, float32 only), which is how the CPU tests check them against the reference.
"""

import contextlib
import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS, or a CPU-only install): torch ops are used instead
    triton = None

LOG2_E = math.log2(math.e)
# Launch settings of the two kernels (block of query rows, block of keys, warps, pipeline stages),
# in order of preference: each call takes the first whose tiles fit the GPU's shared memory.
# `benchmarks/h2o_kernels_bench.py` times them on a GPU; on an H100 in bf16 the first forward
# setting takes 25-30% less time than the second at batch 8-16 and the same at batch 1.
FORWARD_LAUNCHES = (
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
)
COLUMN_SUMS_LAUNCHES = (
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
)
# Triton needs shared memory beyond the pipelined tiles (the probabilities as a matmul operand,
# layout conversions): a setting is taken only if its tiles use at most this share of it.
SHARED_MEMORY_SHARE = 0.75


def available(query: torch.Tensor) -> bool:
    """Whether the kernels can run for this query tensor (batch, heads, q, head_dim)."""
    if triton is None:
        return False
    head_dim = query.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):  # tl.arange needs a power of two
        return False
    if query.is_cuda:
        return choose_launches(query) is not None
    return os.environ.get("TRITON_INTERPRET") == "1" and query.dtype == torch.float32


def choose_launches(query: torch.Tensor) -> tuple[dict, dict] | None:
    """The forward and column-sum settings for this query tensor's GPU (any under Triton's
    interpreter), or None if one kernel has none that fits."""
    budget = SHARED_MEMORY_SHARE * _shared_memory(query.device.index) if query.is_cuda else math.inf
    return launches_within(budget, query.shape[-1], query.element_size())


def launches_within(budget: float, head_dim: int, element_size: int) -> tuple[dict, dict] | None:
    """The first settings of each kernel whose pipelined tiles take at most `budget` bytes."""

    def first_fitting(launches, tiles):
        return next((launch for launch in launches if element_size * head_dim * tiles(launch) <= budget), None)

    # Forward: the query block, and a key and a value block per pipeline stage.
    forward = first_fitting(FORWARD_LAUNCHES, lambda lc: lc["BLOCK_M"] + 2 * lc["num_stages"] * lc["BLOCK_N"])
    # Column sums: the key block, and a query block per pipeline stage.
    columns = first_fitting(COLUMN_SUMS_LAUNCHES, lambda lc: lc["BLOCK_N"] + lc["num_stages"] * lc["BLOCK_M"])
    return None if forward is None or columns is None else (forward, columns)


def attend_and_accumulate(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    row_weights: torch.Tensor | None,
    scaling: float,
    received: torch.Tensor | None,
    key_stop: torch.Tensor | None = None,
    forward_launch: dict | None = None,
    column_sums_launch: dict | None = None,
) -> torch.Tensor:
    """Masked attention output, and received[b, h, k] += sum over rows r of row_weights[b, r % q]
    * softmax_r(scores)[k].

    query (batch, kv_heads * groups, q, d); key and value (batch, kv_heads, k, d); visible (batch,
    kv_heads, q, k) bool, shared by the query heads of a group, with at least one visible key per
    row; row_weights (batch, q) float32; received (batch, kv_heads, k) float32, updated in place
    (both None: the output alone, for methods that accumulate nothing: `attend`).
    Any strides (the caller's slices and transposes are read as they are). `key_stop`, a
    one-element integer tensor on the device, says that keys at and beyond it are invisible to
    every row (the causal end of a pass whose key range was fixed for a CUDA graph): the kernels
    skip them. Returns the output as (batch, q, heads, d), the layout the model's projection takes.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rows = groups * q_len
    out = torch.empty(batch, q_len, heads, head_dim, dtype=query.dtype, device=query.device)
    lse = torch.empty(batch * kv_heads, rows, dtype=torch.float32, device=query.device)
    mask = visible.view(torch.uint8) if visible.dtype == torch.bool else visible
    # Float32 inputs: exact float32 products (not TF32), as torch's float32 matmul.
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    if key_stop is None:
        key_stop = torch.full((1,), k_len, dtype=torch.long, device=query.device)
    common = (
        query, *query.stride(), key, *key.stride(), mask, *mask.stride(),
        kv_heads, groups, q_len, k_len, key_stop, scaling * LOG2_E, lse,
    )  # fmt: skip
    default_forward, default_columns = choose_launches(query)
    # Triton launches on the current GPU: a split model's later layers are on others.
    with on_tensor_device(query):
        launch = forward_launch or default_forward
        _attention_forward[(triton.cdiv(rows, launch["BLOCK_M"]), batch * kv_heads)](
            *common, value, *value.stride(), out, *out.transpose(1, 2).stride(),
            HEAD_DIM=head_dim, PRECISION=precision, **launch,
        )  # fmt: skip
        if received is None:
            return out
        launch = column_sums_launch or default_columns
        _column_sums[(triton.cdiv(k_len, launch["BLOCK_N"]), batch * kv_heads)](
            *common, row_weights, row_weights.stride(0), row_weights.stride(1),
            received, *received.stride(), HEAD_DIM=head_dim, PRECISION=precision, **launch,
        )  # fmt: skip
    return out


def attend(query, key, value, visible, scaling: float, key_stop: torch.Tensor | None = None, forward_launch=None):
    """The masked attention output alone (the forward kernel), for every method: no dense mask is
    expanded over the query heads and converted for SDPA (on an H100 at chunk 128 that took a
    quarter of the baseline's GPU time, benchmarks/RESULTS.md). Arguments as `attend_and_accumulate`."""
    return attend_and_accumulate(query, key, value, visible, None, scaling, None, key_stop, forward_launch)


def on_tensor_device(tensor: torch.Tensor):
    """The tensor's GPU as the current device (where Triton launches), for the duration."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.cache
def _shared_memory(device_index: int) -> int:
    """Bytes of shared memory a block may use on this GPU."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


if triton is not None:

    @triton.jit
    def _query_tile(Q, sqb, sqh, sqm, sqd, b, h, groups, q_len, rows, HEAD_DIM: tl.constexpr):
        """(rows, HEAD_DIM): the folded query rows of KV head h (zeros past the last row)."""
        d = tl.arange(0, HEAD_DIM)
        query_head = h * groups + rows // q_len
        pointers = Q + b * sqb + query_head[:, None] * sqh + (rows % q_len)[:, None] * sqm + d[None, :] * sqd
        return tl.load(pointers, mask=rows[:, None] < groups * q_len, other=0.0)

    @triton.jit
    def _key_tile(K, skb, skh, skn, skd, b, h, k_stop, cols, HEAD_DIM: tl.constexpr):
        """(HEAD_DIM, cols): keys of KV head h, transposed (zeros at and beyond k_stop)."""
        d = tl.arange(0, HEAD_DIM)
        return tl.load(
            K + b * skb + h * skh + cols[None, :] * skn + d[:, None] * skd, mask=cols[None, :] < k_stop, other=0.0
        )

    @triton.jit
    def _masked_scores(
        q, k, M, smb, smh, smm, smn, b, h, groups, q_len, k_stop, scale_log2, rows, cols, PRECISION: tl.constexpr
    ):  # fmt: skip
        """Base-2 scores (rows, cols); -inf where the mask hides the key, at and beyond k_stop,
        and on rows past the last."""
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        seen = tl.load(
            M + b * smb + h * smh + (rows % q_len)[:, None] * smm + cols[None, :] * smn,
            mask=(rows[:, None] < groups * q_len) & (cols[None, :] < k_stop),
            other=0,
        )
        return tl.where(seen != 0, s, float("-inf"))

    @triton.jit
    def _attention_forward(
        Q, sqb, sqh, sqm, sqd, K, skb, skh, skn, skd, M, smb, smh, smm, smn,
        kv_heads, groups, q_len, k_len, STOP, scale_log2, LSE,
        V, svb, svh, svn, svd, OUT, sob, soh, som, sod,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        b, h = bh // kv_heads, bh % kv_heads
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        k_stop = tl.minimum(tl.load(STOP), k_len)
        q = _query_tile(Q, sqb, sqh, sqm, sqd, b, h, groups, q_len, rows, HEAD_DIM)
        for start in range(0, k_stop, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = _key_tile(K, skb, skh, skn, skd, b, h, k_stop, cols, HEAD_DIM)
            s = _masked_scores(
                q, k, M, smb, smh, smm, smn, b, h, groups, q_len, k_stop, scale_log2, rows, cols, PRECISION
            )
            new_max = tl.maximum(running_max, tl.max(s, axis=1))
            # A row with nothing visible yet keeps max -inf: shift by 0 instead (exp2(-inf) = 0).
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp2(s - shift[:, None])
            rescale = tl.exp2(running_max - shift)
            running_sum = running_sum * rescale + tl.sum(p, axis=1)
            v = tl.load(
                V + b * svb + h * svh + cols[:, None] * svn + d[None, :] * svd, mask=cols[:, None] < k_stop, other=0.0
            )
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            running_max = new_max
        row_ok = rows < groups * q_len
        # Rows past the last one (nothing visible, sum 0) are not stored; 1 keeps them finite.
        total = tl.where(running_sum > 0, running_sum, 1.0)
        tl.store(LSE + bh * groups * q_len + rows, running_max + tl.log2(total), mask=row_ok)
        query_head = h * groups + rows // q_len
        pointers = OUT + b * sob + query_head[:, None] * soh + (rows % q_len)[:, None] * som + d[None, :] * sod
        tl.store(pointers, (acc / total[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _column_sums(
        Q, sqb, sqh, sqm, sqd, K, skb, skh, skn, skd, M, smb, smh, smm, smn,
        kv_heads, groups, q_len, k_len, STOP, scale_log2, LSE, W, swb, swm, R, srb, srh, srn,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        b, h = bh // kv_heads, bh % kv_heads
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Summed element-wise per row block, reduced over rows once at the end.
        total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        k_stop = tl.minimum(tl.load(STOP), k_len)
        # A block of keys at or beyond the stop receives nothing: no rows to visit.
        n_rows = tl.where(tl.program_id(0) * BLOCK_N < k_stop, groups * q_len, 0)
        k = _key_tile(K, skb, skh, skn, skd, b, h, k_stop, cols, HEAD_DIM)
        for start in range(0, n_rows, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < groups * q_len
            q = _query_tile(Q, sqb, sqh, sqm, sqd, b, h, groups, q_len, rows, HEAD_DIM)
            s = _masked_scores(
                q, k, M, smb, smh, smm, smn, b, h, groups, q_len, k_stop, scale_log2, rows, cols, PRECISION
            )
            lse = tl.load(LSE + bh * groups * q_len + rows, mask=row_ok, other=0.0)
            weight = tl.load(W + b * swb + (rows % q_len) * swm, mask=row_ok, other=0.0)
            total += tl.exp2(s - lse[:, None]) * weight[:, None]
        pointers = R + b * srb + h * srh + cols * srn
        col_ok = cols < k_len
        tl.store(pointers, tl.load(pointers, mask=col_ok, other=0.0) + tl.sum(total, axis=0), mask=col_ok)
