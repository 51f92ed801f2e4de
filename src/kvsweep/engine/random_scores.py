"""Random eviction's scores: a counter-based hash of (seed, document, layer, KV head, position),
so that a document's decisions are the same at any chunk size, batch size or batch composition."""

import hashlib

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF


def document_key(tokens) -> int:
    """A 32-bit name of a document, from its tokens: the same wherever and with whatever it runs."""
    return int.from_bytes(hashlib.sha256(np.asarray(tokens, dtype="<i8").tobytes()).digest()[:4], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xor-shift-multiply). Every product stays below 2**63."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x1B873593) & _MASK32
    return x ^ (x >> 16)


def _combine(h: torch.Tensor, value) -> torch.Tensor:
    return _mix32((h ^ (value + 0x9E3779B9 + ((h << 6) & _MASK32) + (h >> 2))) & _MASK32)


def random_uniform(
    seed: int, document_keys: torch.Tensor, layer: int, heads: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Uniform numbers in [0, 1) (24 bits), one per (document, KV head, position): a hash of (seed,
    document key, layer, head, position), so independent of how documents are batched or chunked.
    `document_keys`: (batch,); `heads`: (kv_heads,); `positions`: (batch, n). Returns (batch,
    kv_heads, n) float32."""
    h = _mix32(torch.full_like(document_keys, seed & _MASK32))
    h = _combine(h, document_keys & _MASK32)[:, None, None]
    h = _combine(h, layer)
    h = _combine(h, heads.to(h.dtype)[None, :, None])
    h = _combine(h, positions.clamp(min=0)[:, None, :] & _MASK32)
    return (h >> 8).to(torch.float32) / float(1 << 24)
