"""A split model's per-GPU state (layout mirrors, eviction state, kept passes), checked on the CPU.

`module_device` is made to say that the layers from the second on sit on another device: `cpu:0`
is not `cpu` to the engine, so it keeps their layout in a mirror and their eviction and scorer
state apart, as for a model split over GPUs, while every tensor stays on the CPU. The results
must be those of the plain model, batch after batch with the job's passes kept, for every method.
(The split itself, with CUDA graphs captured per GPU, is checked on GPUs: benchmarks/multi_gpu.py.)
"""

import pytest
import torch
from test_methods import SETTINGS, press_of, threshold_between_scores

from kvsweep.engine import press as streaming_threshold_press
from kvsweep.engine.generate import stream_generate
from kvsweep.engine.passes import ReusablePasses
from kvsweep.engine.placement import module_device
from kvsweep.engine.scorers import expected_attention as expected_attention_scorer
from kvsweep.engine.stream_nll import stream_nll

from conftest import random_documents, tiny_llama

ELSEWHERE = torch.device("cpu", 0)
BATCHES = [random_documents([48, 40], seed=11), random_documents([44, 48], seed=12)]  # one shape


def press_for(method, surrogate_dir):
    if method == "kvzap":
        settings = {"sliding_window": 6, "sinks": 2, "kvzap_surrogate": surrogate_dir, "kvzap_type": "mlp"}
        return press_of("kvzap", 0.0, settings)[0]
    threshold = None if method == "streaming_llm" else threshold_between_scores(method)
    return press_of(method, threshold, SETTINGS[method])[0]


def run(model, press_factory, reuse=None):
    """Both batches streamed, then one generation, through `press_factory()`'s presses."""
    press = press_factory()
    streamed = [stream_nll(model, docs, 8, press if reuse else press_factory(), reuse=reuse) for docs in BATCHES]
    generated = stream_generate(model, [doc[:30] for doc in BATCHES[0]], 8, 12, press_factory())
    return streamed, generated


@pytest.mark.parametrize("method", [*SETTINGS, "kvzap"])
def test_layers_elsewhere_give_the_plain_results(method, surrogate_dir, monkeypatch):
    model = tiny_llama()
    plain = run(model, lambda: press_for(method, surrogate_dir))
    streamed = plain[0][0] + plain[0][1]
    assert any(r["kv_kept"] < r["kv_total"] for r in streamed) or method == "streaming_llm", "nothing evicted"

    def pretend(module):
        return ELSEWHERE if getattr(module, "layer_idx", 0) >= 1 else module_device(module)

    monkeypatch.setattr(streaming_threshold_press, "module_device", pretend)
    reusable = ReusablePasses()
    split = run(model, lambda: press_for(method, surrogate_dir), reuse=reusable)
    assert reusable.reused == 1, "the second batch must reuse the first one's passes"
    assert list(reusable._reused[1].layout.mirrors) == [ELSEWHERE], "the layers elsewhere must read a mirror"
    assert split == plain


def test_expected_attention_on_a_copy_of_the_rotary_embedding_gives_the_plain_results(monkeypatch):
    """Layers on another GPU than the rotary embedding rotate with a copy of it made there: here
    every layer does (the embedding is made to look elsewhere), through a copy on the CPU."""
    model = tiny_llama()
    plain = run(model, lambda: press_for("expected_attention", None))
    copies = []
    real_copy = expected_attention_scorer.rotary_copy

    def counted_copy(rotary, device):
        copies.append(device)
        return real_copy(rotary, device)

    monkeypatch.setattr(expected_attention_scorer, "module_device", lambda module: ELSEWHERE)
    monkeypatch.setattr(expected_attention_scorer, "rotary_copy", counted_copy)
    assert run(model, lambda: press_for("expected_attention", None)) == plain
    assert copies, "the scorer must have rotated with copies"
