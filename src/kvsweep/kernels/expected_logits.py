"""Expected Attention's logit of every cached key in one Triton kernel, without writing K Sigma.

The logit of key k for a query head with (rotated) mean m and covariance S is m.k / sqrt(d) +
k'Sk / (2d) (`kvsweep.engine.scorers.ExpectedAttentionScorer`). With torch ops, the quadratic form over a
whole cache writes K S for every key and query head, a tensor group x larger than the cache, and
reads it back: at chunk 128 this cost more than the model's own pass. Here one program takes a
block of keys of one (document, KV head), and for each query head of the group multiplies the
block by S on the tensor cores (16-bit keys: products in 16 bits, sums in float32, as the
attention itself) and reduces each row against its key in registers: only the logits are written.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, float32
only, products exact), which is how the CPU tests hold it to the float64 reference.
"""

import torch

from kvsweep.kernels.launches import INTERPRETED, launched, on_tensor_device, triton

if triton is not None:
    import triton.language as tl

BLOCK_N = 64


def supports(keys: torch.Tensor) -> bool:
    """Whether the engine runs the kernel for this cache slice (batch, kv_heads, n, head_dim): on a
    GPU, or on the CPU under Triton's interpreter (float32), where it `fits`."""
    if triton is None:
        return False
    if not keys.is_cuda and not (INTERPRETED and keys.dtype == torch.float32):
        return False
    return fits(keys)


def fits(keys: torch.Tensor) -> bool:
    """A head size that is a power of two of at least 16 (tl.arange and tl.dot need it)."""
    head_dim = keys.shape[-1]
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def expected_logits(keys: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor | None) -> torch.Tensor:
    """(batch, kv_heads, n, group) float32: mean[g].k + k' covariance[g] k for every key k.

    keys (batch, kv_heads, n, d), any strides (a slice of the cache); mean (batch, kv_heads, group,
    d) and covariance (batch, kv_heads, group, d, d) float32, already rotated and scaled."""
    batch, kv_heads, n, d = keys.shape
    group = mean.shape[2]
    out = torch.empty(batch, kv_heads, n, group, dtype=torch.float32, device=keys.device)
    has_covariance = covariance is not None
    covariance = covariance if has_covariance else mean  # not read
    c_strides = covariance.stride() if has_covariance else (0, 0, 0, 0, 0)
    launched("expected_logits")
    with on_tensor_device(keys):
        _expected_logits[(triton.cdiv(n, BLOCK_N), batch * kv_heads)](
            keys, *keys.stride(), mean, *mean.stride(), covariance, *c_strides, out, *out.stride(), kv_heads, n,
            GROUP=group, HEAD_DIM=d, BLOCK_N=BLOCK_N, HAS_COVARIANCE=has_covariance,
            PRECISION="ieee" if keys.dtype == torch.float32 else "tf32", num_warps=4,
        )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _expected_logits(
        K, skb, skh, skn, skd,
        M, smb, smh, smg, smd,
        C, scb, sch, scg, sci, scj,
        OUT, sob, soh, son, sog,
        kv_heads, n,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_COVARIANCE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        block, bh = tl.program_id(0), tl.program_id(1)
        # 64-bit offsets: a cache of more than 2**31 elements (long contexts, large batches) is indexed whole.
        b, h = (bh // kv_heads).to(tl.int64), (bh % kv_heads).to(tl.int64)
        block = block.to(tl.int64)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        inside = rows < n
        k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + dims[None, :] * skd, mask=inside[:, None], other=0.0)
        k32 = k.to(tl.float32)
        for g in tl.static_range(GROUP):
            m = tl.load(M + b * smb + h * smh + g * smg + dims * smd)
            logit = tl.sum(k32 * m[None, :], axis=1)
            if HAS_COVARIANCE:
                s = tl.load(C + b * scb + h * sch + g * scg + dims[:, None] * sci + dims[None, :] * scj)
                ks = tl.dot(k, s.to(k.dtype), input_precision=PRECISION)
                logit += tl.sum(ks * k32, axis=1)
            tl.store(OUT + b * sob + h * soh + rows * son + g * sog, logit, mask=inside)
