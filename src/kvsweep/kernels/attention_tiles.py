"""The tiles and visibility rule the attention kernels share (`kvsweep.kernels.attention`: the
forward pass; `kvsweep.kernels.column_sums`: H2O's column sums): Triton functions inlined into
each kernel. Rows are folded query rows (row = group * q_len + query); keys are cache slots.
"""

from kvsweep.kernels.launches import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def query_tile(Q, sqb, sqh, sqm, sqd, b, h, groups, q_len, rows, HEAD_DIM: tl.constexpr):
        """(rows, HEAD_DIM): the folded query rows of KV head h (zeros past the last row)."""
        d = tl.arange(0, HEAD_DIM)
        query_head = h * groups + rows // q_len
        pointers = Q + b * sqb + query_head[:, None] * sqh + (rows % q_len)[:, None] * sqm + d[None, :] * sqd
        return tl.load(pointers, mask=rows[:, None] < groups * q_len, other=0.0)

    @triton.jit
    def key_tile(K, skb, skh, skn, skd, b, h, k_stop, cols, HEAD_DIM: tl.constexpr):
        """(HEAD_DIM, cols): keys of KV head h, transposed (zeros at and beyond k_stop)."""
        d = tl.arange(0, HEAD_DIM)
        return tl.load(
            K + b * skb + h * skh + cols[None, :] * skn + d[:, None] * skd, mask=cols[None, :] < k_stop, other=0.0
        )

    @triton.jit
    def query_slots_of(QS, sqs, rows, q_len, row_ok):
        """(rows,) int32: the cache slot of each folded row's query (-1 past the last row)."""
        return tl.load(QS + (rows % q_len) * sqs, mask=row_ok, other=-1).to(tl.int32)

    @triton.jit
    def stop_slot(STOP, QS, sqs, q_len, k_len, STOP_MODE: tl.constexpr):
        """The slot at and beyond which no row sees a key (`attend_and_accumulate`'s modes)."""
        if STOP_MODE == 1:
            stop = tl.minimum(tl.load(STOP).to(tl.int32), k_len)
        elif STOP_MODE == 2:
            stop = tl.minimum(tl.load(QS + (q_len - 1) * sqs).to(tl.int32) + 1, k_len)
        else:
            stop = k_len
        return stop

    @triton.jit
    def kept_keys(E, seb, seh, sen, P, spb, spn, b, h, cols, col_ok):
        """(cols,) bool: the key holds a token of the document that KV head h has not evicted."""
        evicted = tl.load(E + b * seb + h * seh + cols * sen, mask=col_ok, other=1)
        position = tl.load(P + b * spb + cols * spn, mask=col_ok, other=-1)
        return (evicted == 0) & (position >= 0)

    @triton.jit
    def masked_scores(q, k, kept, slot, cols, col_ok, row_ok, scale_log2, PRECISION: tl.constexpr):
        """Base-2 scores (rows, cols); -inf where the row may not see the key (`KeyVisibility`'s
        rule: an earlier kept key, or its own slot), at and beyond the stop (not col_ok), and on
        rows past the last."""
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        causal = (cols[None, :] <= slot[:, None]) & kept[None, :]
        own = (cols[None, :] == slot[:, None]) & col_ok[None, :]
        return tl.where((causal | own) & row_ok[:, None], s, float("-inf"))
