"""A pass's entry scores (a scorer's, in the model's dtype) written into the layer's float32 state
at the pass's query slots, in one kernel instead of a conversion and an `index_copy_` (each a
launch a layer in exact streaming and decoding)."""

import torch

from kvsweep.kernels.launches import launched, on_gpu, on_tensor_device, triton

if triton is not None:
    import triton.language as tl

BLOCK = 256


def supports(entry_scores: torch.Tensor, new_scores: torch.Tensor, query_slots: torch.Tensor) -> bool:
    """On a GPU, where the kernel `fits` (else `index_copy_`, which checks the rest)."""
    return on_gpu(entry_scores) and fits(entry_scores, new_scores, query_slots)


def fits(entry_scores: torch.Tensor, new_scores: torch.Tensor, query_slots: torch.Tensor) -> bool:
    """A float32 state, floating scores of its batch and heads with one per query slot, all on one device."""
    return (
        new_scores.device == entry_scores.device == query_slots.device
        and entry_scores.dtype == torch.float32
        and new_scores.is_floating_point()
        and new_scores.dim() == 3
        and new_scores.shape[:2] == entry_scores.shape[:2]
        and new_scores.shape[2] == query_slots.numel()
    )


def store_entry_scores(entry_scores: torch.Tensor, new_scores: torch.Tensor, query_slots: torch.Tensor) -> None:
    """entry_scores[b, h, query_slots[i]] = float32(new_scores[b, h, i]), in place (what
    `entry_scores.index_copy_(2, query_slots, new_scores.float())` does). entry_scores (batch,
    kv_heads, capacity) float32; new_scores (batch, kv_heads, q), any float dtype and strides;
    query_slots (q,) long; all on one GPU (`supports`)."""
    launched("entry_scores")
    batch, kv_heads, q_len = new_scores.shape
    with on_tensor_device(entry_scores):
        _store_entry_scores[(batch * kv_heads, triton.cdiv(q_len, BLOCK))](
            entry_scores, *entry_scores.stride(), new_scores, *new_scores.stride(), query_slots, query_slots.stride(0),
            q_len, kv_heads, BLOCK=BLOCK,
        )  # fmt: skip


if triton is not None:

    @triton.jit
    def _store_entry_scores(ES, seb, seh, sen, NS, snb, snh, snq, QS, sqs, q_len, kv_heads, BLOCK: tl.constexpr):
        """One block of a (document, KV head)'s new scores, as float32, into their query slots."""
        bh = tl.program_id(0)
        b, h = bh // kv_heads, bh % kv_heads
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = i < q_len
        slot = tl.load(QS + i * sqs, mask=ok, other=0)
        score = tl.load(NS + b * snb + h * snh + i * snq, mask=ok, other=0.0)
        tl.store(ES + b * seb + h * seh + slot * sen, score.to(tl.float32), mask=ok)
