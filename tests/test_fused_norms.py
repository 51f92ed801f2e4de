"""The fused RMSNorm kernel against transformers' eager module (Triton's interpreter on a CPU)."""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from kvsweep import fused_norms

from conftest import KERNEL_DEVICE as DEVICE
from conftest import tiny_llama

needs_triton = pytest.mark.skipif(fused_norms.triton is None, reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize(
    "shape", [(2, 5, 64), (3, 7, 100), (1, 4, 8, 16)], ids=["hidden_64", "ragged_100", "per_head_16"]
)
def test_kernel_matches_the_eager_module(shape):
    """Rows of a power-of-two width, of another width (masked tail), and short per-head rows (40 of
    them, 16 to a program: the last program partly past the end); weights and eps not the defaults."""
    generator = torch.Generator().manual_seed(shape[-1])
    norm = LlamaRMSNorm(shape[-1], eps=1e-3)
    norm.weight.data = torch.randn(shape[-1], generator=generator)
    x = (torch.randn(shape, generator=generator) * 3).to(DEVICE)
    norm = norm.to(DEVICE)
    expected = norm(x)
    got = fused_norms.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@needs_triton
def test_a_strided_input_is_read_as_it_is():
    x = torch.randn(6, 2 * 64)[:, ::2].to(DEVICE)  # rows of stride 128, elements of stride 2
    norm = LlamaRMSNorm(64).to(DEVICE)
    torch.testing.assert_close(fused_norms.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=1e-6, atol=1e-6)


def test_only_the_llama_formula_is_replaced_and_everything_is_restored():
    assert fused_norms.has_llama_formula(LlamaRMSNorm) and fused_norms.has_llama_formula(Qwen3RMSNorm)
    assert not fused_norms.has_llama_formula(GemmaRMSNorm)  # 1 + weight: another formula
    model = tiny_llama()
    model.extra = GemmaRMSNorm(64)
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 2 * 2 + 1  # two a layer, and the last
    x = torch.randn(2, 3, 64)
    before = [norm(x) for norm in norms]
    with fused_norms.fused_rms_norms(model):
        assert all("forward" in vars(norm) for norm in norms) and "forward" not in vars(model.extra)
        # On the CPU the module's own forward runs: the same result to the bit.
        assert all(torch.equal(norm(x), b) for norm, b in zip(norms, before, strict=True))
    assert not any("forward" in vars(norm) for norm in norms)


def test_the_kernel_applies_on_a_gpu_only_to_the_weights_dtype():
    weight = torch.ones(64)
    assert not fused_norms.applies(torch.zeros(2, 64), weight)  # CPU
    if torch.cuda.is_available():
        assert fused_norms.applies(torch.zeros(2, 64, device="cuda"), weight.cuda())
        assert not fused_norms.applies(torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16), weight.cuda())
