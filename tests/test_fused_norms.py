"""The fused RMSNorm kernel against transformers' eager module (Triton's interpreter on a CPU)."""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm

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


@needs_triton
def test_the_residual_add_is_rounded_before_it_is_normed():
    """residual + x in bf16, written out as torch's add rounds it, and normed from that rounded sum
    (the norm of the float32 sum differs on some elements); rows of another width than a power of
    two, a strided residual."""
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 100, generator=generator) * 3).bfloat16().to(DEVICE)
    residual = (torch.randn(6, 200, generator=generator) * 50).bfloat16().to(DEVICE)[:, ::2]
    weight = (torch.rand(100, generator=generator) + 0.5).bfloat16().to(DEVICE)
    total, normed = fused_norms.rms_norm(x, weight, 1e-5, residual=residual)
    assert torch.equal(total, residual + x)
    assert torch.equal(normed, fused_norms.rms_norm(residual + x, weight, 1e-5))
    unrounded = fused_norms.rms_norm((residual.float() + x.float()), weight.float(), 1e-5).bfloat16()
    assert not torch.equal(unrounded, normed), "the case does not tell a rounded sum from an unrounded one"
    norm = LlamaRMSNorm(100, eps=1e-5).to(DEVICE)
    norm.weight.data = weight.float()
    torch.testing.assert_close(
        fused_norms.rms_norm(x.float(), weight.float(), 1e-5, residual=residual.float())[1],
        norm(residual.float() + x.float()), rtol=1e-6, atol=1e-6,
    )  # fmt: skip


@needs_triton
def test_decoder_layers_add_the_residual_in_the_norms_kernel(monkeypatch):
    """The mirrored decoder layer (the kernel allowed on the CPU) against the layer's own forward:
    the same hidden states; Qwen3's layers share the forward; a hooked second norm keeps the add."""
    monkeypatch.setattr(fused_norms, "applies", lambda hidden_states, weight: hidden_states.dtype == weight.dtype)
    calls = []
    rms_norm = fused_norms.rms_norm
    monkeypatch.setattr(
        fused_norms, "rms_norm", lambda *args, **kwargs: calls.append("residual" in kwargs) or rms_norm(*args, **kwargs)
    )
    assert fused_norms.has_mirrored_decoder_layer(LlamaDecoderLayer), "transformers' LlamaDecoderLayer.forward changed"
    assert fused_norms.has_mirrored_decoder_layer(Qwen3DecoderLayer)
    assert not fused_norms.has_mirrored_decoder_layer(GemmaRMSNorm)
    model = tiny_llama().to(DEVICE)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    layer = model.model.layers[1]
    cos, sin = model.model.rotary_emb(x, torch.arange(5, device=DEVICE)[None].expand(2, 5))
    expected = layer(x, position_embeddings=(cos, sin))
    model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *args: None)
    with fused_norms.fused_rms_norms(model):
        assert "forward" in vars(layer) and "forward" not in vars(model.model.layers[0])
        got = layer(x, position_embeddings=(cos, sin))
    assert "forward" not in vars(layer)
    assert calls == [False, True]  # the first norm alone, then the add and the second norm
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
