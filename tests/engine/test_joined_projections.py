"""Joined projections and the SiLU-and-product kernel against transformers' eager modules (Triton's
interpreter on a CPU; the joined products themselves are plain torch)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from kvsweep.engine.integration import families, joined
from kvsweep.engine.integration.fusions import fused
from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.scorers import KVzapScorer
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.kernels import silu_and_mul

from conftest import KERNEL_DEVICE as DEVICE
from conftest import random_documents, tiny_llama, tiny_surrogate

needs_triton = pytest.mark.skipif(silu_and_mul.triton is None, reason="Triton is not installed")


@pytest.fixture
def on_this_device(monkeypatch):
    """Joined projections wherever the kernel runs (the CPU under Triton's interpreter)."""
    monkeypatch.setattr(joined, "on_gpu", lambda weight: silu_and_mul.triton is not None)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("shape", [(3, 2 * 96), (2, 5, 2 * 1500)], ids=["96_wide", "1500_wide_two_blocks"])
def test_silu_and_mul_is_torchs_arithmetic(shape, dtype):
    """act_fn(gate) * up as transformers' MLP computes it: in bf16 the SiLU is rounded before the
    product, which a single rounding at the end would not reproduce. Widths that are not a power
    of two, and rows wider than one program's block (the masked tail of the second block)."""
    generator = torch.Generator().manual_seed(shape[-1])
    gate_up = (torch.randn(shape, generator=generator) * 4).to(dtype).to(DEVICE)
    gate_up.view(-1)[7] = float("nan")  # a gate: NaN stays NaN
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    got = silu_and_mul.silu_and_mul(gate_up)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().sum() == 1
    if dtype == torch.bfloat16 or DEVICE == "cuda":  # on a GPU the same expf as torch's
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    else:  # the CPU's exp (torch's vectorized one, numpy's in the interpreter) differs in float32's last bit
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    if dtype == torch.bfloat16:
        once = (F.silu(gate.float()) * up.float()).to(dtype)
        assert (once.nan_to_num() != expected.nan_to_num()).float().mean() > 0.02, "one rounding passes too"


@needs_triton
def test_silu_and_mul_reads_strided_rows():
    whole = torch.randn(4, 2 * 2 * 40).bfloat16().to(DEVICE)
    gate_up = whole[:, ::2]  # elements of stride 2: copied first
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul.silu_and_mul(gate_up), F.silu(gate) * up)
    rows = whole.view(8, 80)[::2]  # rows of stride 160: read as they are
    gate, up = rows.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul.silu_and_mul(rows), F.silu(gate) * up)


def llama(bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=bias, mlp_bias=bias, initializer_range=0.15,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


class InheritedAttention(LlamaAttention):
    """Llama's forward, inherited by a class the fusion table does not declare."""


@needs_triton
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_joined_layers_compute_what_the_modules_compute(on_this_device, bias):
    """Each layer's attention (grouped queries: k and v narrower than q) and MLP, joined, against
    the modules' own forwards on the same inputs; a subclass of a declared class (classes are
    matched by identity) keeps its own forward."""
    model = llama(bias).to(DEVICE)
    layer = model.model.layers[0]
    model.model.layers[1].self_attn.__class__ = InheritedAttention
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cos, sin = model.model.rotary_emb(x, torch.arange(5, device=DEVICE)[None].expand(2, 5))
    expected_attention, _ = layer.self_attn(x, (cos, sin), None)
    expected_mlp = layer.mlp(x)
    with fused(model):
        assert "forward" in vars(layer.self_attn) and "forward" in vars(layer.mlp)
        assert "forward" not in vars(model.model.layers[1].self_attn)
        got_attention, _ = layer.self_attn(x, (cos, sin), None)
        got_mlp = layer.mlp(x)
    torch.testing.assert_close(got_attention, expected_attention, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_mlp, expected_mlp, rtol=1e-5, atol=1e-6)


@needs_triton
def test_a_streamed_evaluation_is_unchanged_by_joined_projections(monkeypatch):
    """KVzap streaming through the press (whose context joins the projections): the same NLLs and
    the same evictions as with the modules' own forwards."""
    model = tiny_llama(seed=4).to(DEVICE)
    surrogate = tiny_surrogate(model).to(DEVICE)
    scorer = KVzapScorer(model_type="mlp", surrogate="tiny")
    scorer.kvzap_model, scorer.kvzap_model_name = surrogate, "tiny"
    press = StreamingThresholdPress(scorer, threshold=0.0, sliding_window_size=4)
    docs = random_documents([40, 29])
    monkeypatch.setattr(joined, "on_gpu", lambda weight: False)
    plain = stream_nll(model, docs, 8, press)
    monkeypatch.setattr(joined, "on_gpu", lambda weight: True)
    fused_run = stream_nll(model, docs, 8, press)
    assert sum(r["kv_kept"] for r in plain) < sum(r["kv_total"] for r in plain)  # it evicts
    assert [r["kv_kept"] for r in fused_run] == [r["kv_kept"] for r in plain]
    for a, b in zip(fused_run, plain, strict=True):
        assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)
    attention = model.model.layers[1].self_attn
    assert joined.adjacent([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])


@needs_triton
def test_weights_are_moved_once_keeping_their_values_and_parameters(on_this_device):
    model = llama(bias=True)
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    projections = [attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj]
    parameters = [p for linear in projections for p in (linear.weight, linear.bias)]
    values = [p.detach().clone() for p in parameters]
    assert not joined.adjacent([attention.q_proj.weight, attention.k_proj.weight])
    with torch.inference_mode(), fused(model):  # as the engine's passes run
        pass
    assert not any("forward" in vars(m) for m in model.modules())  # restored
    assert not any(p.is_inference() for p in parameters)  # the model can still be trained
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    assert attention.q_proj.weight.grad is not None
    assert [p for linear in projections for p in (linear.weight, linear.bias)] == parameters  # same objects
    assert all(torch.equal(p, v) for p, v in zip(parameters, values, strict=True))
    weight, bias = joined.joined([attention.q_proj, attention.k_proj, attention.v_proj])
    assert weight.shape == (64 + 32 + 32, 64) and bias.shape == (128,)
    assert torch.equal(weight, torch.cat(values[0:6:2])) and torch.equal(bias, torch.cat(values[1:6:2]))
    addresses = [p.data_ptr() for p in parameters]
    with fused(model):
        assert "forward" in vars(attention)
    assert [p.data_ptr() for p in parameters] == addresses  # not moved again: captured graphs stay valid


@needs_triton
def test_only_what_the_table_declares_is_replaced(on_this_device):
    """Attentions the fusion table does not declare (Qwen3's), an MLP of another activation or
    dtype, hooked or already replaced modules keep their forwards."""
    qwen = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
    )  # fmt: skip
    with fused(qwen):
        assert "forward" not in vars(qwen.model.layers[0].self_attn)  # per-head norms: its own forward
        assert "forward" in vars(qwen.model.layers[0].mlp)
    model = llama()
    model.config.hidden_act = "gelu"
    gelu = LlamaForCausalLM(model.config).eval()
    half = llama().half()
    hooked = llama()
    hooked.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *args: None)
    hooked.model.layers[0].mlp.forward = hooked.model.layers[0].mlp.forward  # replaced on the instance
    with (
        fused(gelu),
        fused(half),
        fused(hooked),
    ):
        assert "forward" not in vars(gelu.model.layers[0].mlp) and "forward" in vars(gelu.model.layers[0].self_attn)
        assert "forward" not in vars(half.model.layers[0].mlp) and "forward" in vars(half.model.layers[0].self_attn)
        assert "forward" not in vars(hooked.model.layers[0].self_attn) and "forward" in vars(
            hooked.model.layers[1].self_attn
        )
    assert "forward" in vars(hooked.model.layers[0].mlp)  # not ours to remove


def test_nothing_is_joined_off_the_gpu():
    model = llama()
    attention = model.model.layers[0].self_attn
    with fused(model) as made:
        assert not made.replaced[families.QKV] and not made.replaced[families.GATE_UP]
        assert not any(
            "forward" in vars(layer.self_attn) or "forward" in vars(layer.mlp) for layer in model.model.layers
        )
    assert not joined.adjacent([attention.q_proj.weight, attention.k_proj.weight])
