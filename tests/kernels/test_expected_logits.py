"""Expected Attention's logit kernel against an explicit float64 loop (Triton's interpreter on a
CPU in float32; `TRITON_INTERPRET=0 pytest tests/kernels` runs it on
the GPU, in bf16 as the study does)."""

import pytest
import torch

from kvsweep.kernels import expected_logits as expected_attention_kernel

from conftest import KERNEL_DEVICE as DEVICE

pytestmark = pytest.mark.skipif(expected_attention_kernel.triton is None, reason="Triton is not installed")
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


def reference_logits(keys, mean, covariance):
    """For every document, KV head, key and query head g of the group: mean[g].k + k' C[g] k, one
    key at a time in float64."""
    batch, kv_heads, n, d = keys.shape
    group = mean.shape[2]
    out = torch.zeros(batch, kv_heads, n, group, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            for j in range(n):
                k = keys[b, h, j].double().cpu()
                for g in range(group):
                    value = mean[b, h, g].double().cpu() @ k
                    if covariance is not None:
                        value += k @ covariance[b, h, g].double().cpu() @ k
                    out[b, h, j, g] = value
    return out


@pytest.mark.parametrize("covariance", [True, False], ids=["with_covariance", "mean_only"])
@pytest.mark.parametrize("n,head_dim,group", [(70, 16, 4), (64, 32, 1), (5, 16, 2)])
def test_logits_match_float64(n, head_dim, group, covariance):
    """On a slice of a larger cache (the strides the scorer passes), with a block of keys that is
    not full (n not a multiple of the kernel's block)."""
    g = torch.Generator().manual_seed(n + head_dim + group)
    batch, kv_heads = 2, 2
    cache = torch.randn(batch, kv_heads, n + 9, head_dim, generator=g)
    keys = cache[:, :, :n].to(DEVICE, DTYPE)
    mean = torch.randn(batch, kv_heads, group, head_dim, generator=g).to(DEVICE)
    spread = torch.randn(batch, kv_heads, group, head_dim, head_dim, generator=g) / head_dim
    matrix = (spread @ spread.transpose(-1, -2)).to(DEVICE) if covariance else None
    logits = expected_attention_kernel.expected_logits(keys, mean, matrix)
    expected = reference_logits(keys, mean, matrix)
    # float32 under the interpreter: exact products; bf16 on a GPU: the covariance taken in bf16.
    tolerance = 1e-5 if DTYPE == torch.float32 else 2e-2
    assert logits.shape == expected.shape
    assert torch.allclose(logits.double().cpu(), expected, rtol=tolerance, atol=tolerance * expected.abs().max())


def test_supported_only_where_it_can_run(monkeypatch):
    assert not expected_attention_kernel.supports(torch.zeros(1, 2, 3, 12))  # head_dim not a power of two
    assert not expected_attention_kernel.fits(torch.zeros(1, 2, 3, 12))
    monkeypatch.setattr(expected_attention_kernel, "INTERPRETED", False)
    assert not expected_attention_kernel.supports(torch.zeros(1, 2, 3, 16))  # CPU tensor without the interpreter
    monkeypatch.setattr(expected_attention_kernel, "INTERPRETED", True)
    assert expected_attention_kernel.supports(torch.zeros(1, 2, 3, 16))
    assert not expected_attention_kernel.supports(torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16))
