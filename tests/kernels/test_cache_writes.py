"""The pass's key and value writes in one kernel against `StaticLayer`'s two `index_copy_` (Triton's
interpreter on a CPU)."""

import pytest
import torch
from transformers.cache_utils import StaticLayer

from kvsweep.engine.cache import PassCacheLayer
from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.scorers import H2OScorer
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.kernels import cache_writes

from conftest import KERNEL_DEVICE as DEVICE
from conftest import random_documents, tiny_llama

needs_triton = pytest.mark.skipif(cache_writes.triton is None, reason="Triton is not installed")


def layers(head_dims=(16, 8), capacity: int = 12, device=DEVICE):
    """A kvsweep cache layer and transformers' own, both initialized for 3 documents x 2 heads."""
    ours, theirs = PassCacheLayer(capacity), StaticLayer(capacity)
    for layer in (ours, theirs):
        layer.lazy_initialization(
            torch.zeros(3, 2, 0, head_dims[0], device=device), torch.zeros(3, 2, 0, head_dims[1], device=device)
        )
    return ours, theirs


@needs_triton
@pytest.mark.parametrize("q_len", [1, 3, 20], ids=["one_query", "three_queries", "twenty_queries_two_blocks"])
def test_one_kernel_writes_what_index_copy_writes(monkeypatch, q_len):
    """Strided new keys (a transposed view, as the projections hand them over), values of another
    head size, slots out of order; every other slot keeps what it held. Over 16 queries the queries
    take two blocks."""
    monkeypatch.setattr(cache_writes, "supports", lambda *args: cache_writes.fits(*args))
    ours, theirs = layers(capacity=24)
    generator = torch.Generator().manual_seed(q_len)
    for layer in (ours, theirs):  # earlier content, the same in both
        layer.keys.copy_(torch.randn(layer.keys.shape, generator=torch.Generator().manual_seed(0)))
        layer.values.copy_(torch.randn(layer.values.shape, generator=torch.Generator().manual_seed(1)))
    new_keys = torch.randn(3, q_len, 2, 16, generator=generator).to(DEVICE).transpose(1, 2)
    new_values = torch.randn(3, q_len, 2, 8, generator=generator).to(DEVICE).transpose(1, 2)
    slots = torch.randperm(24, generator=generator)[:q_len].to(DEVICE)
    calls = []
    write_pass = cache_writes.write_pass
    monkeypatch.setattr(cache_writes, "write_pass", lambda *args: calls.append(1) or write_pass(*args))
    keys, values = ours.update(new_keys, new_values, {"cache_position": slots})
    expected_keys, expected_values = theirs.update(new_keys, new_values, {"cache_position": slots})
    assert calls == [1] and keys is ours.keys and values is ours.values
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


def test_anything_else_takes_static_layers_update():
    ours, theirs = layers(device="cpu")
    new_keys, new_values = torch.randn(3, 2, 2, 16), torch.randn(3, 2, 2, 8)
    slots = torch.tensor([4, 7])
    assert cache_writes.fits(ours.keys, ours.values, new_keys, new_values, slots)
    assert not cache_writes.supports(ours.keys, ours.values, new_keys, new_values, slots)  # the CPU
    assert not cache_writes.fits(ours.keys, ours.values, new_keys.double(), new_values.double(), slots)
    assert not cache_writes.fits(ours.keys, ours.values, new_keys, new_values, slots[:1])
    assert not cache_writes.fits(ours.keys, ours.values, new_keys, new_values, slots.float())
    assert not cache_writes.fits(ours.keys, ours.values, new_keys[:2], new_values[:2], slots)
    keys, values = ours.update(new_keys, new_values, {"cache_position": slots})
    expected = theirs.update(new_keys, new_values, {"cache_position": slots})
    assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])


@needs_triton
def test_a_streamed_evaluation_is_unchanged_by_the_kernel(monkeypatch):
    """H2O at chunk 4 over documents of different lengths: the same NLLs and evictions to the bit,
    and the kernel wrote every pass (eager passes: a CUDA graph's replays call no python)."""
    model = tiny_llama(seed=6).to(DEVICE)
    press = StreamingThresholdPress(H2OScorer(), threshold=0.02, sliding_window_size=4)
    docs = random_documents([23, 14])
    monkeypatch.setattr(cache_writes, "supports", lambda *args: False)  # index_copy_ (on a GPU too)
    plain = stream_nll(model, docs, 4, press, cuda_graphs=False)
    calls = []
    monkeypatch.setattr(cache_writes, "supports", lambda *args: calls.append(1) or cache_writes.fits(*args))
    kernel = stream_nll(model, docs, 4, press, cuda_graphs=False)
    assert len(calls) == 2 * 6  # two layers, six passes
    assert sum(r["kv_kept"] for r in plain) < sum(r["kv_total"] for r in plain)  # it evicts
    assert [(r["nll_sum"], r["kv_kept"]) for r in kernel] == [(r["nll_sum"], r["kv_kept"]) for r in plain]
