"""A job's batches of one shape share their passes (`ReusablePasses`): cache, eviction state and
captured graphs are reset in place, never carried over. Every method, streaming and generation,
gives exactly what fresh passes give, batch after batch, across a change of shape and back."""

import pytest
import torch

from kvsweep.engine.generate import stream_generate
from kvsweep.engine.layout import BatchLayout
from kvsweep.engine.methods import build_press
from kvsweep.engine.passes import ReusablePasses
from kvsweep.engine.state import LayerEviction
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.kernels import attention as attention_kernels
from kvsweep.kernels import launches as kernel_launches
from kvsweep.study.methods import get_method

from conftest import random_documents

# Batches of documents of different lengths, which share one shape (whole key buckets of slots),
# but the third, of three documents: what is kept is replaced there and built again after it.
LENGTHS = [(33, 31), (35, 28), (12, 9, 20), (34, 12), (30, 29)]
BATCHES = [random_documents(lengths, seed=11 + i) for i, lengths in enumerate(LENGTHS)]
SETTINGS = {
    "baseline": {},
    "h2o": {"local_window": 6, "sinks": 2},
    "kvzap": {"sliding_window": 6, "sinks": 2},
    "random": {"sliding_window": 6, "sinks": 2, "seed": 3},
    "expected_attention": {"sliding_window": 6, "sinks": 2, "n_future_positions": 16},
    "knorm": {"sliding_window": 6, "sinks": 2},
    "streaming_llm": {"sliding_window": 6, "sinks": 2},
}
# Thresholds that evict a good share of these documents' caches.
THRESHOLDS = {"h2o": 0.057, "kvzap": 0.0, "random": 0.5, "expected_attention": 0.21, "knorm": -4.6}


def press_of(method, surrogate_dir):
    spec = get_method(method)
    settings = {**SETTINGS[method], **({"kvzap_surrogate": surrogate_dir} if method == "kvzap" else {})}
    threshold = THRESHOLDS.get(method)
    return build_press(spec, threshold, spec.resolve(threshold, settings))


def same_results(kept, fresh):
    assert len(kept) == len(fresh)
    for a, b in zip(kept, fresh, strict=True):
        assert {k: v for k, v in a.items() if k != "nll_sum"} == {k: v for k, v in b.items() if k != "nll_sum"}
        if "nll_sum" in a:
            assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-6)


@pytest.mark.parametrize("method", list(SETTINGS))
def test_kept_passes_stream_as_fresh_ones(model, surrogate_dir, method):
    press = press_of(method, surrogate_dir)
    kept = ReusablePasses()
    evicting = 0
    for documents in BATCHES:
        with_kept = stream_nll(model, documents, 5, press, reuse=kept)
        same_results(with_kept, stream_nll(model, documents, 5, press_of(method, surrogate_dir)))
        evicting += sum(r["kv_kept"] < r["kv_total"] for r in with_kept)
    assert evicting > 0 or method == "baseline"
    assert kept.reused == 2  # the second and the last batch got their predecessor's passes back


@pytest.mark.parametrize("method", ["baseline", "h2o", "kvzap", "random", "expected_attention"])
def test_kept_passes_generate_as_fresh_ones(model, surrogate_dir, method):
    press = press_of(method, surrogate_dir)
    kept = ReusablePasses()
    # Prompts of one length (as when cut to max_length): the same shape and padding gap in every batch.
    for documents in ([d[:28] for d in BATCHES[0]], [d[:28] for d in BATCHES[1]], [d[:28] for d in BATCHES[4]]):
        with_kept = stream_generate(model, documents, 5, 8, press, reuse=kept)
        same_results(with_kept, stream_generate(model, documents, 5, 8, press_of(method, surrogate_dir)))
    assert kept.reused == 2


@pytest.mark.slow  # the Triton interpreter: tens of seconds (make check skips it)
def test_h2o_kernels_skipping_decided_keys_keep_passes_as_fresh_ones(model, surrogate_dir, monkeypatch):
    """H2O through the Triton kernels (chunk 32), column sums in blocks of 16 keys, so that later
    passes skip the blocks of keys decided before them: batch after batch of kept passes (whose
    state is reset in place) gives what fresh passes give."""
    if attention_kernels.triton is None:
        pytest.skip("Triton is not installed")
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(kernel_launches, "COLUMN_SUMS_LAUNCHES", (small,))
    press, kept = press_of("h2o", surrogate_dir), ReusablePasses()
    evicting = 0
    for seed in (21, 22, 23):
        documents = random_documents([100, 77], seed=seed)
        with_kept = stream_nll(model, documents, 32, press, reuse=kept)
        same_results(with_kept, stream_nll(model, documents, 32, press_of("h2o", surrogate_dir)))
        evicting += sum(r["kv_kept"] < r["kv_total"] for r in with_kept)
    assert evicting > 0
    assert kept.reused == 2


def test_a_kept_state_refuses_another_decision_window():
    """The window from which H2O's kernels skip decided keys is a constant in a captured graph: a
    kept state takes a fresh one's values only for the same window."""
    layout = BatchLayout.right_padded([[1, 2, 3], [4, 5]], capacity=8, device="cpu")
    kept, fresh = (LayerEviction.allocate(layout, 2, entry_scores=False, accumulate_attention=True) for _ in "ab")
    kept.decision_window = fresh.decision_window = 6
    fresh.attention_received.fill_(0.5)
    kept.assign(fresh)
    assert torch.equal(kept.attention_received, fresh.attention_received)
    fresh.decision_window = 7
    with pytest.raises(ValueError, match="decision window"):
        kept.assign(fresh)
