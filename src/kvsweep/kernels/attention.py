"""Attention over the eviction state in Triton kernels: every method's output on a GPU, and H2O's
column sums, without writing the matrix of queries x keys.

H2O (Zhang et al. 2023, https://arxiv.org/abs/2306.14048) scores a cached key by the attention
probability it has received. Computed with torch ops, a pass writes and reads the whole
(batch, kv_heads, query rows, keys) probability matrix several times (scores, mask, softmax, the
weighted column sum); at chunk 128 with a batch of 8 this costs a quarter of the model's time.
The other methods need the output only, which torch's SDPA gives from a mask of that size. Here
nothing of that size is written:

1. `_attention_forward` (FlashAttention's forward pass): one program per block of query rows
   streams over the keys with a running maximum and sum (online softmax) and gives the attention
   output and each row's log-sum-exp of its visible scores. When those programs would leave the
   GPU idle (batch 1, decoding, exact streaming), each also takes a share of the keys and
   `_combine_splits` merges the shares (flash-decoding's split-K), in a fixed order.
2. For H2O, `kvsweep.kernels.column_sums` then sums each key's probabilities over the rows (as
   FlashAttention's backward pass walks keys), from the log-sum-exp the forward kernel wrote.

No mask is read: which keys a query row sees is computed in the kernels from per-key and per-query
vectors (`kvsweep.engine.layout.KeyVisibility`: the eviction flags of the KV head, the slots' document
positions, the queries' slots; the shared tiles and rule are in `kvsweep.kernels.attention_tiles`), so
nothing of size queries x keys is built or read for any method,
and keys past the pass's last query are skipped. Query heads of a KV group are folded into the rows as in
`kvsweep.engine.attention` (row = group * q_len + query). Scores, sums and the output are accumulated in
float32 (scores in base 2: exp2 is the hardware's exponential).

The kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, float32 only), which is how the CPU tests check them against the reference.
"""

import math

import torch

from kvsweep.kernels import column_sums, launches
from kvsweep.kernels.launches import launched, triton

if triton is not None:
    import triton.language as tl

    from kvsweep.kernels.attention_tiles import (
        kept_keys,
        key_tile,
        masked_scores,
        query_slots_of,
        query_tile,
        stop_slot,
    )

LOG2_E = math.log2(math.e)


def supports(query: torch.Tensor) -> bool:
    """Whether the kernels can run for this query tensor (batch, heads, q, head_dim): on a GPU
    where a launch setting's tiles fit its shared memory, or on the CPU under Triton's interpreter
    (float32), where they `fit`."""
    if triton is None or not fits(query):
        return False
    if query.is_cuda:
        return launches.choose_launches(query) is not None
    return launches.INTERPRETED and query.dtype == torch.float32


def fits(query: torch.Tensor) -> bool:
    """A head size that is a power of two of at least 16 (tl.arange and tl.dot need it)."""
    head_dim = query.shape[-1]
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def attend_and_accumulate(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seen,
    row_weights: torch.Tensor | None,
    scaling: float,
    received: torch.Tensor | None,
    key_stop: torch.Tensor | None = None,
    forward_launch: dict | None = None,
    column_sums_launch: dict | None = None,
    undecided_from: torch.Tensor | None = None,
    split_keys: int | None = None,
    stop_after_last_query: bool = False,
    undecided_offset: int = 0,
    undecided_span: int | None = None,
    row_splits: int | None = None,
    sums_from: int = 0,
) -> torch.Tensor:
    """Masked attention output, and received[b, h, k] += sum over rows r of row_weights[b, r % q]
    * softmax_r(scores)[k].

    query (batch, kv_heads * groups, q, d); key and value (batch, kv_heads, k, d); `seen`, a
    `kvsweep.engine.layout.KeyVisibility` (evicted (batch, kv_heads, >= k) bool, position (batch, >= k)
    long, query_slots (q,) long): the keys each query row sees, shared by the query heads of a
    group; row_weights (batch, q) float32, or None: H2O's, 1 / groups for a query of the document
    and 0 for padding (a slot whose position is -1), worked out in the kernel; received (batch,
    kv_heads, k) float32, updated in place (None: the output alone, for methods that accumulate
    nothing: `attend`).
    Any strides (the caller's slices and transposes are read as they are). `key_stop`, a
    one-element integer tensor on the device, says that keys at and beyond it are invisible to
    every row (the causal end of a pass whose key range was fixed for a CUDA graph): the kernels
    skip them. `stop_after_last_query`: the stop is the last query's slot + 1, read by the kernels
    from `seen.query_slots` (no query of a pass sees a later key; no tensor op is launched for it).
    `undecided_from` (batch,) long, plus `undecided_offset`: in each document, keys in slots below
    undecided_from[b] + undecided_offset were decided before this pass, so their sums are no longer
    read (H2O decides a key once): key blocks wholly below it are skipped and keep what they
    received (default: every key receives). `undecided_span`: at most this many slots of a document
    can still need sums (H2O: its window, the pass's queries and padding gaps); when the programs
    over them would leave the GPU idle (batch 1), the column sums split the rows into shares as
    well (`launches.row_splits`), which `_add_row_splits` adds up in a fixed order.
    `row_splits`: that number of shares, forced (default: chosen). `sums_from`: no key below this
    slot needs a sum in any document (a python bound, fixed for a CUDA graph): the column sums
    launch no programs for key blocks wholly below it. `split_keys`:
    the keys each program of the forward kernel walks (a multiple of its key block; default: chosen
    for the GPU by `launches.key_splits`); the shares are combined by `_combine_splits` in a fixed order.
    Returns the output as (batch, q, heads, d), the layout the model's projection takes.
    """
    launched("attention" if received is None else "attention+column_sums")
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rows = groups * q_len
    out = torch.empty(batch, q_len, heads, head_dim, dtype=query.dtype, device=query.device)
    lse = torch.empty(batch * kv_heads, rows, dtype=torch.float32, device=query.device)
    evicted = seen.evicted.view(torch.uint8) if seen.evicted.dtype == torch.bool else seen.evicted
    position, slots = seen.position, seen.query_slots
    # Float32 inputs: exact float32 products (not TF32), as torch's float32 matmul.
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    if key_stop is not None and stop_after_last_query:
        raise ValueError("give key_stop or stop_after_last_query, not both")
    # Every row's stop: k_len (0), key_stop's value (1), or the last query's slot + 1 (2). The
    # pointer is unread in modes 0 and 2.
    stop_mode = 1 if key_stop is not None else 2 if stop_after_last_query else 0
    common = (
        query, *query.stride(), key, *key.stride(), evicted, *evicted.stride(), position, *position.stride(),
        slots, slots.stride(0), kv_heads, groups, q_len, k_len, slots if key_stop is None else key_stop,
        scaling * LOG2_E, lse,
    )  # fmt: skip
    default_forward, default_columns = launches.choose_launches(query, rows)
    launch = forward_launch or default_forward
    row_blocks = triton.cdiv(rows, launch["BLOCK_M"])
    if split_keys is None:
        splits, span = launches.key_splits(query, row_blocks * batch * kv_heads, k_len, launch["BLOCK_N"])
    else:
        splits, span = triton.cdiv(k_len, split_keys), split_keys
    # Each split's output (normalized by its own sum) and log-sum-exp, in float32; unused with one.
    part_out, part_lse = lse, lse
    if splits > 1:
        part_out = torch.empty(splits, batch * kv_heads, rows, head_dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(splits, batch * kv_heads, rows, dtype=torch.float32, device=query.device)
    # Triton launches on the current GPU: a split model's later layers are on others.
    with launches.on_tensor_device(query):
        _attention_forward[(row_blocks, batch * kv_heads, splits)](
            *common, value, *value.stride(), out, *out.transpose(1, 2).stride(), span, part_out, part_lse,
            HEAD_DIM=head_dim, PRECISION=precision, STOP_MODE=stop_mode, SPLIT=splits > 1, **launch,
        )  # fmt: skip
        if splits > 1:
            _combine_splits[(row_blocks, batch * kv_heads)](
                part_out, part_lse, splits, kv_heads, groups, q_len, lse, out, *out.transpose(1, 2).stride(),
                HEAD_DIM=head_dim, BLOCK_M=launch["BLOCK_M"],
            )  # fmt: skip
        if received is None:
            return out
        column_sums.add_column_sums(
            common, query, seen, k_len, received, row_weights, column_sums_launch or default_columns,
            precision=precision, stop_mode=stop_mode, undecided_from=undecided_from, undecided_offset=undecided_offset,
            undecided_span=undecided_span, shares_wanted=row_splits, sums_from=sums_from,
        )  # fmt: skip
    return out


def attend(query, key, value, seen, scaling: float, key_stop: torch.Tensor | None = None, **options):
    """The masked attention output alone (the forward kernel), for every method: no dense mask is
    built, expanded over the query heads or converted for SDPA (on an H100 at chunk 128 that took a
    quarter of the baseline's GPU time, benchmarks/results/h100_llama-3.1-8b_2026-11-28_profile_chunk128.txt). Arguments as `attend_and_accumulate`
    (`forward_launch`, `split_keys`, `stop_after_last_query` by keyword)."""
    return attend_and_accumulate(query, key, value, seen, None, scaling, None, key_stop, **options)


if triton is not None:

    @triton.jit
    def _attention_forward(
        Q, sqb, sqh, sqm, sqd, K, skb, skh, skn, skd, E, seb, seh, sen, P, spb, spn, QS, sqs,
        kv_heads, groups, q_len, k_len, STOP, scale_log2, LSE,
        V, svb, svh, svn, svd, OUT, sob, soh, som, sod, SPAN, PART_OUT, PART_LSE,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
        STOP_MODE: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        """One block of folded query rows of one KV head over the keys [split * SPAN, (split + 1) *
        SPAN) before the stop: with SPLIT, that share's output and log-sum-exp go to PART_OUT and
        PART_LSE for `_combine_splits`; else (one share) the output and LSE themselves."""
        bh = tl.program_id(1)
        b, h = bh // kv_heads, bh % kv_heads
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        first = tl.program_id(2) * SPAN
        k_stop = tl.minimum(stop_slot(STOP, QS, sqs, q_len, k_len, STOP_MODE), first + SPAN)
        row_ok = rows < groups * q_len
        q = query_tile(Q, sqb, sqh, sqm, sqd, b, h, groups, q_len, rows, HEAD_DIM)
        slot = query_slots_of(QS, sqs, rows, q_len, row_ok)
        for start in range(first, k_stop, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < k_stop
            k = key_tile(K, skb, skh, skn, skd, b, h, k_stop, cols, HEAD_DIM)
            kept = kept_keys(E, seb, seh, sen, P, spb, spn, b, h, cols, col_ok)
            s = masked_scores(q, k, kept, slot, cols, col_ok, row_ok, scale_log2, PRECISION)
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
        # A row that sees nothing here (past the last row, or every key of its share hidden) has sum
        # 0: its output 0 and, with SPLIT, log-sum-exp -inf, which gives its share no weight.
        total = tl.where(running_sum > 0, running_sum, 1.0)
        lse = running_max + tl.log2(total)
        if SPLIT:
            part = (tl.program_id(2) * tl.num_programs(1) + bh) * groups * q_len + rows
            tl.store(PART_LSE + part, lse, mask=row_ok)
            tl.store(PART_OUT + part[:, None] * HEAD_DIM + d[None, :], acc / total[:, None], mask=row_ok[:, None])
        else:
            tl.store(LSE + bh * groups * q_len + rows, lse, mask=row_ok)
            _store_output(OUT, sob, soh, som, sod, acc / total[:, None], b, h, groups, q_len, rows, row_ok, HEAD_DIM)

    @triton.jit
    def _store_output(OUT, sob, soh, som, sod, out, b, h, groups, q_len, rows, row_ok, HEAD_DIM: tl.constexpr):
        """The folded rows' output (rows, HEAD_DIM) into the model's (batch, q, heads, d) layout."""
        d = tl.arange(0, HEAD_DIM)
        query_head = h * groups + rows // q_len
        pointers = OUT + b * sob + query_head[:, None] * soh + (rows % q_len)[:, None] * som + d[None, :] * sod
        tl.store(pointers, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _combine_splits(
        PART_OUT, PART_LSE, splits, kv_heads, groups, q_len, LSE, OUT, sob, soh, som, sod,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """The output and log-sum-exp of a block of rows from its key shares: each share's output
        weighted by exp2(its lse - the total's), in split order (the same result on every run)."""
        bh = tl.program_id(1)
        b, h = bh // kv_heads, bh % kv_heads
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        n_rows = groups * q_len
        row_ok = rows < n_rows
        stride = tl.num_programs(1) * n_rows  # one split's rows
        top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for split in range(splits):
            top = tl.maximum(top, tl.load(PART_LSE + split * stride + bh * n_rows + rows, mask=row_ok, other=0.0))
        # A row that sees no key at all keeps top -inf: shift by 0 (every weight 0), sum taken as 1.
        shift = tl.where(top == float("-inf"), 0.0, top)
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        for split in range(splits):
            part = split * stride + bh * n_rows + rows
            weight = tl.exp2(tl.load(PART_LSE + part, mask=row_ok, other=0.0) - shift)
            total += weight
            acc += weight[:, None] * tl.load(PART_OUT + part[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None])
        total = tl.where(total > 0, total, 1.0)
        tl.store(LSE + bh * n_rows + rows, top + tl.log2(total), mask=row_ok)
        _store_output(OUT, sob, soh, som, sod, acc / total[:, None], b, h, groups, q_len, rows, row_ok, HEAD_DIM)
