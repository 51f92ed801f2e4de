"""The fused rotary embedding against transformers' `apply_rotary_pos_emb` (Triton's interpreter on a CPU)."""

import pytest
import torch
from transformers.models.llama import modeling_llama

from kvsweep.engine.integration.fusions import fused
from kvsweep.kernels import rope

from conftest import KERNEL_DEVICE as DEVICE
from conftest import tiny_llama


@pytest.mark.skipif(rope.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("heads,d", [(4, 16), (3, 32), (2, 16)], ids=["4_heads", "3_heads_ragged_block", "2_heads"])
def test_rotation_matches_the_eager_function(heads, d):
    """q and k as the model hands them over (transposed views of the projection's output, another
    number of heads for k), cos and sin of distinct positions per document."""
    generator = torch.Generator().manual_seed(heads * d)
    batch, seq = 2, 5
    q = torch.randn(batch, seq, heads, d, generator=generator).transpose(1, 2).to(DEVICE)
    k = torch.randn(batch, seq, 1, d, generator=generator).transpose(1, 2).to(DEVICE)
    angles = torch.rand(batch, seq, d // 2, generator=generator) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(DEVICE)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(DEVICE)
    expected_q, expected_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
    assert got_q.shape == expected_q.shape and got_q.stride() == expected_q.stride()
    torch.testing.assert_close(got_q, expected_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, expected_k, rtol=1e-6, atol=1e-6)


def test_the_function_is_replaced_for_the_duration_and_falls_back_off_the_gpu():
    model = tiny_llama()
    original = modeling_llama.apply_rotary_pos_emb
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    cos, sin = torch.rand(1, 3, 16), torch.rand(1, 3, 16)
    with fused(model):
        replaced = modeling_llama.apply_rotary_pos_emb
        assert replaced is not original
        with fused(model):  # nested: not wrapped twice
            assert modeling_llama.apply_rotary_pos_emb is replaced
        got = replaced(q, k, cos, sin)  # CPU tensors: the original runs
    assert modeling_llama.apply_rotary_pos_emb is original
    expected = original(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not rope.supports(q, k, cos, sin, 1)


def test_only_shapes_the_kernel_takes_are_given_to_it():
    q, k, cos = torch.zeros(1, 4, 3, 128), torch.zeros(1, 2, 3, 128), torch.zeros(1, 3, 128)
    assert rope.fits(q, k, cos, cos, 1)
    assert rope.fits(q.bfloat16(), k.bfloat16(), cos.bfloat16(), cos.bfloat16(), 1)
    assert not rope.fits(q.half(), k.half(), cos.half(), cos.half(), 1)  # fp16: rounding not reproduced
    assert not rope.fits(q, k.bfloat16(), cos, cos, 1)  # mixed dtypes
    assert not rope.fits(q, k, cos, cos, 2)
    q96, k96, cos96 = torch.zeros(1, 4, 3, 96), torch.zeros(1, 2, 3, 96), torch.zeros(1, 3, 96)
    assert not rope.fits(q96, k96, cos96, cos96, 1)  # head size 96: halves of 48
    assert not rope.fits(q, k, cos[:, :2], cos[:, :2], 1)  # cos of other positions


@pytest.mark.skipif(rope.triton is None, reason="Triton is not installed")
def test_bf16_rotation_rounds_as_torch_does():
    """In bf16 each product and the sum are rounded to bf16, as torch's eager operations round
    them: the result is the eager one, bit for bit (float32 arithmetic with one rounding at the end
    would differ on about a sixth of the elements)."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 64, 8, 32, generator=generator).bfloat16()
    q[0, 3, 1, 5] = float("nan")  # NaN stays NaN (on a GPU, rounding on the bits once made it -0.0)
    q = q.transpose(1, 2).to(DEVICE)
    k = torch.randn(2, 64, 2, 32, generator=generator).bfloat16().transpose(1, 2).to(DEVICE)
    angles = torch.rand(2, 64, 16, generator=generator) * 100
    cos = torch.cat([angles.cos(), angles.cos()], -1).bfloat16().to(DEVICE)
    sin = torch.cat([angles.sin(), angles.sin()], -1).bfloat16().to(DEVICE)
    expected_q, expected_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got_q = rope.rotate(q, cos, sin)
    assert got_q.isnan().sum() == 2 and torch.equal(got_q.isnan(), expected_q.isnan())
    assert torch.equal(got_q.nan_to_num(), expected_q.nan_to_num())
    assert torch.equal(rope.rotate(k, cos, sin), expected_k)
    once = (q.float() * cos[:, None].float() + modeling_llama.rotate_half(q).float() * sin[:, None].float()).bfloat16()
    assert (once != expected_q).float().mean() > 0.05, "the case does not tell one rounding from three"
