"""The fused RMSNorm kernel against transformers' eager module (Triton's interpreter on a CPU)."""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kvsweep.engine.integration import families
from kvsweep.engine.integration.fusions import fused
from kvsweep.kernels import rms_norm

from conftest import KERNEL_DEVICE as DEVICE
from conftest import tiny_llama

needs_triton = pytest.mark.skipif(rms_norm.triton is None, reason="Triton is not installed")


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
    got = rms_norm.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@needs_triton
def test_a_strided_input_is_read_as_it_is():
    x = torch.randn(6, 2 * 64)[:, ::2].to(DEVICE)  # rows of stride 128, elements of stride 2
    norm = LlamaRMSNorm(64).to(DEVICE)
    torch.testing.assert_close(rms_norm.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=1e-6, atol=1e-6)


def test_only_the_declared_norms_are_replaced_and_everything_is_restored():
    """Llama's norms are in the fusion table (`families`); Gemma's (1 + weight: another formula)
    is not, and keeps its forward inside a Llama model."""
    model = tiny_llama()
    model.extra = GemmaRMSNorm(64)
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 2 * 2 + 1  # two a layer, and the last
    x = torch.randn(2, 3, 64)
    before = [norm(x) for norm in norms]
    with fused(model) as made:
        assert made.replaced[families.NORM] == norms
        assert all("forward" in vars(norm) for norm in norms) and "forward" not in vars(model.extra)
        # On the CPU the module's own forward runs: the same result to the bit.
        assert all(torch.equal(norm(x), b) for norm, b in zip(norms, before, strict=True))
    assert not any("forward" in vars(norm) for norm in norms)


def test_the_kernel_is_used_on_a_gpu_only_for_the_weights_dtype():
    weight = torch.ones(64)
    assert not rms_norm.supports(torch.zeros(2, 64), weight)  # CPU
    assert rms_norm.fits(torch.zeros(2, 64), weight)
    assert not rms_norm.fits(torch.zeros(2, 64, dtype=torch.bfloat16), weight)
    assert not rms_norm.fits(torch.zeros(2, 128)[:, ::2], weight)  # rows of stride 2
    assert not rms_norm.fits(torch.zeros(2, 64), weight, residual=torch.zeros(2, 64, dtype=torch.float64))
    if torch.cuda.is_available():
        assert rms_norm.supports(torch.zeros(2, 64, device="cuda"), weight.cuda())


@needs_triton
def test_the_residual_add_is_rounded_before_it_is_normed():
    """residual + x in bf16, written out as torch's add rounds it, and normed from that rounded sum
    (the norm of the float32 sum differs on some elements); rows of another width than a power of
    two, a strided residual."""
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 100, generator=generator) * 3).bfloat16().to(DEVICE)
    residual = (torch.randn(6, 200, generator=generator) * 50).bfloat16().to(DEVICE)[:, ::2]
    weight = (torch.rand(100, generator=generator) + 0.5).bfloat16().to(DEVICE)
    total, normed = rms_norm.rms_norm(x, weight, 1e-5, residual=residual)
    assert torch.equal(total, residual + x)
    assert torch.equal(normed, rms_norm.rms_norm(residual + x, weight, 1e-5))
    unrounded = rms_norm.rms_norm((residual.float() + x.float()), weight.float(), 1e-5).bfloat16()
    assert not torch.equal(unrounded, normed), "the case does not tell a rounded sum from an unrounded one"
    norm = LlamaRMSNorm(100, eps=1e-5).to(DEVICE)
    norm.weight.data = weight.float()
    torch.testing.assert_close(
        rms_norm.rms_norm(x.float(), weight.float(), 1e-5, residual=residual.float())[1],
        norm(residual.float() + x.float()), rtol=1e-6, atol=1e-6,
    )  # fmt: skip


@needs_triton
def test_decoder_layers_add_the_residual_in_the_norms_kernel(monkeypatch):
    """The mirrored decoder layer (the kernel allowed on the CPU) against the layer's own forward:
    the same hidden states; a hooked second norm keeps the add."""
    monkeypatch.setattr(rms_norm, "supports", rms_norm.fits)
    calls = []
    kernel = rms_norm.rms_norm
    monkeypatch.setattr(
        rms_norm, "rms_norm", lambda *args, **kwargs: calls.append("residual" in kwargs) or kernel(*args, **kwargs)
    )
    model = tiny_llama().to(DEVICE)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    layer = model.model.layers[1]
    cos, sin = model.model.rotary_emb(x, torch.arange(5, device=DEVICE)[None].expand(2, 5))
    expected = layer(x, position_embeddings=(cos, sin))
    model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *args: None)
    with fused(model):
        assert "forward" in vars(layer) and "forward" not in vars(model.model.layers[0])
        got = layer(x, position_embeddings=(cos, sin))
    assert "forward" not in vars(layer)
    assert calls == [False, True]  # the first norm alone, then the add and the second norm
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
