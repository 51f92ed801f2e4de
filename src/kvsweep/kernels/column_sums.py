"""H2O's column sums in Triton: the attention each cached key receives in a pass, summed over the
query rows, without writing the matrix of queries x keys.

As FlashAttention's backward pass walks keys, one program per block of keys (and KV head) streams
over the query rows, recomputes the scores, and sums exp(score - logsumexp) * row weight, from
the log-sum-exp the forward kernel (`kvsweep.kernels.attention`) wrote. Each key's sum is made in
a fixed order: no atomics, the same result on every run (a CUDA graph replay equals the eager
pass). Keys decided before the pass are skipped. At batch 1 the few programs over the undecided
keys also split the rows into shares (`launches.row_splits`), which `_add_row_splits` adds
up in share order.
"""

import torch

from kvsweep.kernels import launches
from kvsweep.kernels.launches import triton

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


def add_column_sums(
    common: tuple, query: torch.Tensor, seen, k_len: int, received: torch.Tensor, row_weights, launch: dict, *,
    precision: str, stop_mode: int, undecided_from, undecided_offset: int, undecided_span, shares_wanted,
    sums_from: int,
):  # fmt: skip
    """received[b, h, k] += the pass's column sums, in place, after the forward kernel wrote the
    rows' log-sum-exp (`common`: the arguments both kernels take first). The other arguments are
    `attend_and_accumulate`'s; call it on the query's GPU."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = received.shape[1]
    groups = heads // kv_heads
    rows = groups * q_len
    position, slots = seen.position, seen.query_slots
    # Unread pointers where a mode needs none (row weights from the positions; every key receives).
    weights = position[:, :1] if row_weights is None else row_weights
    undecided = slots if undecided_from is None else undecided_from
    first_block = max(sums_from, 0) // launch["BLOCK_N"]
    key_blocks = triton.cdiv(k_len, launch["BLOCK_N"]) - first_block
    row_blocks = triton.cdiv(rows, launch["BLOCK_M"])
    if key_blocks <= 0:
        return
    if shares_wanted is None:
        live_blocks = key_blocks if undecided_span is None else min(key_blocks, undecided_span // launch["BLOCK_N"] + 2)
        shares_wanted = launches.row_splits(query, live_blocks * batch * kv_heads, row_blocks)
    span = triton.cdiv(row_blocks, max(shares_wanted, 1)) * launch["BLOCK_M"]  # rows per share
    shares = triton.cdiv(rows, span)
    # Each share's sums, in float32, when the rows are split (every key of the launched blocks
    # written, by slot).
    part = (
        torch.empty(shares, batch * kv_heads, k_len, dtype=torch.float32, device=query.device)
        if shares > 1
        else received
    )
    _column_sums[(key_blocks, batch * kv_heads, shares)](
        *common, weights, weights.stride(0), weights.stride(1), 1.0 / groups,
        received, *received.stride(), undecided, undecided.stride(0), undecided_offset, first_block, span, part,
        HEAD_DIM=head_dim, PRECISION=precision, STOP_MODE=stop_mode, WEIGHTS_GIVEN=row_weights is not None,
        SOME_DECIDED=undecided_from is not None, ROW_SPLIT=shares > 1, **launch,
    )  # fmt: skip
    if shares > 1:
        _add_row_splits[(key_blocks, batch * kv_heads)](
            part, shares, k_len, kv_heads, first_block, received, *received.stride(), BLOCK_N=launch["BLOCK_N"]
        )


if triton is not None:

    @triton.jit
    def _column_sums(
        Q, sqb, sqh, sqm, sqd, K, skb, skh, skn, skd, E, seb, seh, sen, P, spb, spn, QS, sqs,
        kv_heads, groups, q_len, k_len, STOP, scale_log2, LSE, W, swb, swm, real_weight, R, srb, srh, srn,
        U, sub, u_offset, FIRST_BLOCK, SPAN, PART,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
        STOP_MODE: tl.constexpr, WEIGHTS_GIVEN: tl.constexpr, SOME_DECIDED: tl.constexpr, ROW_SPLIT: tl.constexpr,
    ):  # fmt: skip
        """The sums of one block of keys of one KV head over the rows [share * SPAN, (share + 1) *
        SPAN): added into R, or with ROW_SPLIT written to PART for `_add_row_splits`."""
        bh = tl.program_id(1)
        b, h = bh // kv_heads, bh % kv_heads
        first = (FIRST_BLOCK + tl.program_id(0)) * BLOCK_N
        cols = first + tl.arange(0, BLOCK_N)
        # Summed element-wise per row block, reduced over rows once at the end.
        total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        # A block of keys at or beyond the stop, or wholly decided already, gets nothing: no rows
        # to visit, nothing loaded (a stop of 0 masks every load).
        stop = stop_slot(STOP, QS, sqs, q_len, k_len, STOP_MODE)
        wanted = first < stop
        if SOME_DECIDED:
            wanted = wanted & (first + BLOCK_N > tl.load(U + b * sub) + u_offset)
        k_stop = tl.where(wanted, stop, 0)
        row_first = tl.program_id(2) * SPAN
        n_rows = tl.where(wanted, tl.minimum(groups * q_len, row_first + SPAN), 0)
        k = key_tile(K, skb, skh, skn, skd, b, h, k_stop, cols, HEAD_DIM)
        col_ok = cols < k_stop
        kept = kept_keys(E, seb, seh, sen, P, spb, spn, b, h, cols, col_ok)
        for start in range(row_first, n_rows, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < groups * q_len
            q = query_tile(Q, sqb, sqh, sqm, sqd, b, h, groups, q_len, rows, HEAD_DIM)
            slot = query_slots_of(QS, sqs, rows, q_len, row_ok)
            s = masked_scores(q, k, kept, slot, cols, col_ok, row_ok, scale_log2, PRECISION)
            lse = tl.load(LSE + bh * groups * q_len + rows, mask=row_ok, other=0.0)
            if WEIGHTS_GIVEN:
                weight = tl.load(W + b * swb + (rows % q_len) * swm, mask=row_ok, other=0.0)
            else:  # H2O's: 1 / groups (as a float32 number) for a query of the document, 0 for padding
                real = tl.load(P + b * spb + slot * spn, mask=row_ok, other=-1) >= 0
                weight = tl.where(real, real_weight, 0.0)
            total += tl.exp2(s - lse[:, None]) * weight[:, None]
        if ROW_SPLIT:  # every key of the share (0 where not wanted), so that PART is written in full
            tl.store(
                PART + (tl.program_id(2) * tl.num_programs(1) + bh) * k_len + cols, tl.sum(total, 0), mask=cols < k_len
            )
        else:
            pointers = R + b * srb + h * srh + cols * srn
            in_range = cols < tl.where(wanted, k_len, 0)
            tl.store(pointers, tl.load(pointers, mask=in_range, other=0.0) + tl.sum(total, axis=0), mask=in_range)

    @triton.jit
    def _add_row_splits(PART, shares, k_len, kv_heads, FIRST_BLOCK, R, srb, srh, srn, BLOCK_N: tl.constexpr):
        """R += the row shares' sums of a block of keys, in share order (the same on every run; a
        key no share summed gets 0 added)."""
        bh = tl.program_id(1)
        b, h = bh // kv_heads, bh % kv_heads
        cols = (FIRST_BLOCK + tl.program_id(0)) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = cols < k_len
        total = tl.zeros((BLOCK_N,), tl.float32)
        for share in range(shares):
            total += tl.load(PART + (share * tl.num_programs(1) + bh) * k_len + cols, mask=ok, other=0.0)
        pointers = R + b * srb + h * srh + cols * srn
        tl.store(pointers, tl.load(pointers, mask=ok, other=0.0) + total, mask=ok)
