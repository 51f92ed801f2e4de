"""KVzap's surrogate in two kernels against its torch modules (Triton's interpreter on a CPU)."""

import pytest
import torch
from torch import nn

from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.scorers import KVzapScorer
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.kernels import surrogate_mlp

from conftest import KERNEL_DEVICE as DEVICE
from conftest import every_pass_through_split_kernels, random_documents, tiny_llama, tiny_surrogate

needs_triton = pytest.mark.skipif(surrogate_mlp.triton is None, reason="Triton is not installed")


def mlp(width: int, hidden: int, heads: int, bias: bool, dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, heads, bias=bias)).to(
        DEVICE, dtype
    )


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_scores_land_in_the_query_slots_as_the_modules_compute_them(dtype, bias):
    """Three documents of two query tokens (6 rows of the 16-row block), an input width that is not
    a multiple of the programs' 256 (a masked tail), 100 hidden units (not a power of two), 5 heads.
    Every other slot keeps what it held."""
    surrogate = mlp(600, 100, 5, bias, dtype)
    hidden_states = (torch.randn(3, 2, 600, generator=torch.Generator().manual_seed(1)) * 2).to(DEVICE, dtype)
    slots = torch.tensor([6, 2], device=DEVICE)
    entry = torch.full((3, 5, 9), -7.0, device=DEVICE)
    assert surrogate_mlp.fits(surrogate, hidden_states, entry, slots)
    surrogate_mlp.score_into(entry, hidden_states, surrogate, slots)
    expected = surrogate(hidden_states).float().transpose(1, 2)  # (3, 5, 2): what the press stores
    torch.testing.assert_close(entry[:, :, slots], expected, **tolerance(dtype))
    others = [s for s in range(9) if s not in (6, 2)]
    assert torch.equal(entry[:, :, others], torch.full((3, 5, 7), -7.0, device=DEVICE))


def tolerance(dtype) -> dict:
    """float32: the products' order only. bf16: the hidden units rounded to bf16 after a sum in
    another order than torch's may land one bf16 step apart, and the score moves by as much."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


@needs_triton
def test_bf16_scores_round_where_torch_rounds():
    """In bf16 the hidden units, the GELU and the score are each rounded; the kernels' scores are
    torch's on nearly all tokens (a sum in another order rarely rounds the other way), while
    computing in float32 throughout would miss on many."""
    surrogate = mlp(256, 64, 4, True, torch.bfloat16, seed=3)
    hidden_states = (torch.randn(16, 1, 256, generator=torch.Generator().manual_seed(2)) * 3).to(DEVICE, torch.bfloat16)
    entry = torch.zeros(16, 4, 1, device=DEVICE)
    surrogate_mlp.score_into(entry, hidden_states, surrogate, torch.zeros(1, dtype=torch.long, device=DEVICE))
    expected = surrogate(hidden_states).float().transpose(1, 2)
    assert (entry == expected).float().mean() > 0.9
    with torch.no_grad():
        unrounded = surrogate.float()(hidden_states.float()).transpose(1, 2)
    surrogate.to(torch.bfloat16)
    assert (unrounded == expected).float().mean() < 0.5, "the case does not tell rounded steps from float32"


def test_only_the_mlp_surrogate_on_few_tokens_fits():
    entry, x, slots = torch.zeros(2, 4, 8), torch.zeros(2, 1, 32), torch.tensor([3])
    surrogate = mlp(32, 16, 4, True, torch.float32).cpu()
    assert surrogate_mlp.fits(surrogate, x, entry, slots)
    assert not surrogate_mlp.supports(surrogate, x, entry, slots)  # CPU
    assert not surrogate_mlp.fits(nn.Linear(32, 4), x, entry, slots)
    tanh = nn.Sequential(nn.Linear(32, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 4))
    assert not surrogate_mlp.fits(tanh, x, entry, slots)
    assert not surrogate_mlp.fits(surrogate, torch.zeros(2, 9, 32), entry, torch.arange(9))  # 18 rows
    assert not surrogate_mlp.fits(surrogate, x, entry.double(), slots)
    assert not surrogate_mlp.fits(surrogate, x.half(), entry, slots)
    assert not surrogate_mlp.fits(surrogate, x, entry, torch.tensor([3, 4]))  # a slot per token
    assert not surrogate_mlp.fits(surrogate, x, entry, slots.float())


@pytest.mark.slow  # the Triton interpreter: tens of seconds (make check skips it)
@needs_triton
def test_exact_streaming_with_the_kernels_matches_the_modules(monkeypatch):
    """KVzap at chunk 1 through the press: the surrogate kernels (allowed on the CPU) against the
    modules, the same NLLs and evictions; the kernels ran, and a subclass with its own `score`, or
    a `score` replaced on the instance, is asked instead."""
    model = tiny_llama(seed=5).to(DEVICE)
    surrogate = tiny_surrogate(model).to(DEVICE)
    every_pass_through_split_kernels(monkeypatch)

    def press(cls=KVzapScorer):
        scorer = cls(model_type="mlp", surrogate="tiny")
        scorer.kvzap_model, scorer.kvzap_model_name = surrogate, "tiny"
        return StreamingThresholdPress(scorer, threshold=0.0, sliding_window_size=4)

    docs = random_documents([18, 11])
    monkeypatch.setattr(surrogate_mlp, "supports", lambda *args: False)  # the modules (on a GPU too)
    plain = stream_nll(model, docs, 1, press())
    calls = []
    monkeypatch.setattr(surrogate_mlp, "supports", lambda *args: calls.append(1) or surrogate_mlp.fits(*args))
    kernels = stream_nll(model, docs, 1, press())
    assert len(calls) > 0
    assert sum(r["kv_kept"] for r in plain) < sum(r["kv_total"] for r in plain)  # it evicts
    assert [r["kv_kept"] for r in kernels] == [r["kv_kept"] for r in plain]
    for a, b in zip(kernels, plain, strict=True):
        assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)

    class Doubled(KVzapScorer):
        def score(self, *args, **kwargs):
            return 2 * super().score(*args, **kwargs)

    calls.clear()
    stream_nll(model, docs, 1, press(Doubled))
    assert calls == []
    patched = press()
    plain_score = patched.press.score
    patched.press.score = lambda *args, **kwargs: 2 * plain_score(*args, **kwargs)  # on the instance
    stream_nll(model, docs, 1, patched)
    assert calls == []
