"""Eviction applied as a real attention mask, registered with transformers' `AttentionInterface`.

kvpress hides evicted keys by overwriting them with a "fake key" that must give exp(q.k) = 0 for
every query of the forward pass; with more than a few queries per pass no such key exists and it
raises. Here the eviction state decides which keys each query sees, for any chunk size: on a GPU
in kvsweep's Triton kernels (`kvsweep.kernels.attention`, which read the state itself), and on
the CPU as a boolean mask for `torch.nn.functional.scaled_dot_product_attention` or explicit
probabilities.

Grouped-query attention is handled by folding the query heads of a KV group into the query axis:
(batch, kv_heads * groups, q, d) -> (batch, kv_heads, groups * q, d), so the kernel sees plain
multi-head attention over the KV heads and the mask stays per KV head.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvsweep.kernels import attention as attention_kernels

ATTENTION_NAME = "kvsweep_evicting_attention"  # transformers' AttentionInterface name

# Without the Triton kernels (the CPU, or a GPU without Triton), up to this many query rows per KV
# head (query heads of a group x queries of the pass) attention is computed with plain batched
# matmuls. The fused SDPA kernels parallelize over blocks of query rows: with a few rows (exact
# streaming, decoding) they run one block per batch row and KV head and walk the whole cache
# serially, while a matmul splits the keys over the GPU.
FUSED_MIN_ROWS = 32

# The attribute under which a press hangs a layer's `LayerEviction` on the attention module while
# its context is active (kvpress does the same with `masked_key_indices`).
STATE_ATTRIBUTE = "kvsweep_eviction"


def masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention over the keys that are neither evicted nor in the future.

    If the layer's state accumulates attention (H2O), the column sums of this pass's probabilities
    are added to the state: by `kvsweep.kernels.attention` on a GPU (which computes the output as well),
    else from the probabilities computed explicitly for this pass only (chunk x cache, never n x n).
    """
    state = getattr(module, STATE_ATTRIBUTE, None)
    if state is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = head_dim**-0.5 if scaling is None else scaling
    # The cache may hold more slots than this pass can see (a static cache): keys [0, hi) only.
    k_len = state.layout.slots[1]
    key, value = key[:, :, :k_len], value[:, :, :k_len]

    accumulates = state.attention_received is not None

    # On a GPU, every pass: the Triton kernels, which work out from the eviction state which keys
    # each row sees (no mask of queries x keys is built), and split the keys over programs when the
    # rows alone would leave the GPU idle (decoding, exact streaming, batch 1). H2O gets the output
    # and the column sums, and never writes the probabilities. On the CPU, only H2O's passes with
    # many rows (Triton's interpreter is far slower than torch; the CPU tests check the kernels
    # themselves against float64, few rows and split keys included).
    if takes_kernels(query, groups * q_len, accumulates):
        # No query of the pass sees a key past its last query's slot: the kernels read that slot
        # themselves, as they work out H2O's row weights (1 / groups a real query) and the first
        # undecided slot from the layout. Each torch op here would be a kernel a layer, a few
        # microseconds each, which at batch 1 are a visible share of a decoding step.
        seen = state.key_visibility()
        if not accumulates:
            return attention_kernels.attend(query, key, value, seen, scaling, stop_after_last_query=True), None
        received = state.attention_received[:, :, :k_len]
        # Keys decided before this pass are never scored again: their sums are skipped (a slot
        # holds a position no later than itself, so slots below the first undecided position,
        # tokens_before - window, hold decided keys only). No document with a real query in this
        # pass has its first undecided slot below the first query slot - window - max_gap (python
        # bounds, the range the press's hook decides over), so no programs are launched there;
        # documents that ended earlier have padding queries only, whose weight 0 adds nothing.
        # The undecided keys span at most window + the pass's queries + max_gap slots: few
        # programs at batch 1, so the kernel splits the rows.
        window, layout = state.decision_window, state.layout
        out = attention_kernels.attend_and_accumulate(
            query, key, value, seen, None, scaling, received, stop_after_last_query=True,
            undecided_from=None if window is None else layout.tokens_before, undecided_offset=-(window or 0),
            undecided_span=None if window is None else window + q_len + layout.max_gap,
            sums_from=0 if window is None else layout.slots[0] - window - layout.max_gap,
        )  # fmt: skip
        return out, None

    visible = state.visible_keys()  # (batch, kv_heads, q, k)
    grouped_query = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    if groups * q_len > FUSED_MIN_ROWS and not accumulates:
        out = masked_sdpa(grouped_query, key, value, visible, scaling)
    else:
        probs = masked_probabilities(grouped_query, key, visible, scaling)
        out = torch.matmul(probs, value)
        if accumulates:
            state.attention_received[:, :, :k_len] += weighted_column_sums(probs, state.valid_queries() / groups)

    out = out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()
    return out, None


def takes_kernels(query, rows: int, accumulates: bool) -> bool:
    """Whether a pass with `rows` query rows per KV head attends through the Triton kernels: every
    pass on a GPU; on the CPU (Triton's interpreter) only H2O's passes with many rows."""
    return attention_kernels.supports(query) and (query.is_cuda or (accumulates and rows > FUSED_MIN_ROWS))


def masked_sdpa(grouped_query, key, value, visible, scaling=None) -> torch.Tensor:
    """SDPA of (batch, kv_heads, groups * q, d) folded queries under the (batch, kv_heads, q, k)
    mask; the kernel takes one mask row per folded query row, so the mask is expanded over the
    query heads."""
    batch, kv_heads, q_len, k_len = visible.shape
    rows = grouped_query.shape[2]
    mask = (
        visible[:, :, None].expand(batch, kv_heads, rows // q_len, q_len, k_len).reshape(batch, kv_heads, rows, k_len)
    )
    return F.scaled_dot_product_attention(grouped_query, key, value, attn_mask=mask, scale=scaling)


def masked_probabilities(grouped_query, key, visible, scaling) -> torch.Tensor:
    """Softmax probabilities (batch, kv_heads, groups * q, k) of the folded queries under the mask.

    In the model's dtype, in place where possible: for H2O each pass over this matrix is its cost
    (softmax accumulates in float32 internally). The mask is applied through a (batch, kv_heads,
    groups, q, k) view, never expanded.
    """
    batch, kv_heads, q_len, k_len = visible.shape
    probs = torch.matmul(grouped_query * scaling, key.transpose(-1, -2))
    probs.view(batch, kv_heads, -1, q_len, k_len).masked_fill_(~visible[:, :, None], float("-inf"))
    return torch.softmax(probs, dim=-1)


def weighted_column_sums(probs, row_weights) -> torch.Tensor:
    """(batch, kv_heads, k) float32: sum over the folded rows of row_weights[b, r % q] * probs,
    one (1 x groups*q) @ (groups*q x k) product per KV head. `row_weights` (batch, q): for H2O 1 /
    groups for a real query, 0 for padding (sum over queries, mean over the query heads)."""
    groups = probs.shape[2] // row_weights.shape[1]
    weights = row_weights.repeat(1, groups).to(probs.dtype)
    return torch.matmul(weights[:, None, None, :], probs)[:, :, 0].float()


AttentionInterface.register(ATTENTION_NAME, masked_attention)
