"""The engine against the independent reference (tests/reference.py) and its invariants."""

import math
from itertools import pairwise

import pytest
import torch

from kvsweep.engine.methods import build_press
from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.scorers import H2OScorer
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.kernels import attention as attention_kernels
from kvsweep.kernels import launches as kernel_launches
from kvsweep.study.methods import get_method

from conftest import every_pass_through_split_kernels, random_documents, tiny_llama, tiny_surrogate
from reference import Weights, reference_stream

WINDOW = 6
# (method, threshold, settings): thresholds chosen to evict between 20% and 80% of the compressible
# region of the test documents; the test checks that they do.
CASES = [
    ("kvzap", 0.0, {"sliding_window": WINDOW}),
    ("kvzap_no_sink", 0.05, {"sliding_window": WINDOW}),
    ("h2o", 0.06, {"local_window": WINDOW}),
    ("h2o", 0.06, {"local_window": WINDOW, "sinks": 3}),
]


def build(method, threshold, settings, surrogate_dir):
    spec = get_method(method)
    if method.startswith("kvzap"):
        settings = {**settings, "kvzap_surrogate": surrogate_dir}
    resolved = spec.resolve(threshold, settings)
    return build_press(spec, threshold, resolved), resolved


@pytest.fixture(scope="module")
def weights(model):
    return Weights(model, tiny_surrogate(model))


@pytest.mark.parametrize("buckets", [None, 1, 2], ids=["one_key_bucket", "bucket_of_1_chunk", "bucket_of_2_chunks"])
# Chunks 1-16 take the matmul attention path, 32 the fused SDPA kernel (> FUSED_MIN_ROWS query rows).
@pytest.mark.parametrize("chunk", [1, 3, 16, 32])
@pytest.mark.parametrize("method,threshold,settings", CASES)
def test_matches_reference(model, weights, surrogate_dir, method, threshold, settings, chunk, buckets):
    """Also with key buckets of 1 or 2 chunks: each pass then attends to keys [0, end of its
    bucket) only, and decides over a slot range bounded by the bucket (what a CUDA graph fixes)."""
    documents = random_documents([40, 29])
    press, resolved = build(method, threshold, settings, surrogate_dir)
    results = stream_nll(model, documents, chunk, press, key_bucket=buckets and buckets * chunk)
    sinks = resolved["sinks"]
    for doc, result in zip(documents, results, strict=True):
        nll, counts, margins = reference_stream(weights, doc, chunk, method, threshold, WINDOW, sinks)
        assert min(margins) > 1e-5, "threshold too close to a score: the comparison would be fragile"
        assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)
        assert {k: result[k] for k in counts} == counts
        evicted = 1 - counts["kv_kept_compressible"] / counts["kv_total_compressible"]
        assert 0.2 <= evicted <= 0.8, f"threshold evicts {evicted:.0%}, outside the 20-80% the test needs"


@pytest.mark.parametrize("column_sums", ["triton", "torch"])
def test_h2o_column_sums_either_way_match_reference(model, weights, surrogate_dir, monkeypatch, column_sums):
    """Chunk 32 (> FUSED_MIN_ROWS rows) takes the Triton kernels where they run (on the CPU through
    Triton's interpreter); without Triton, the explicit probabilities. Both hold the reference."""
    calls = []
    if column_sums == "torch":
        monkeypatch.setattr(attention_kernels, "supports", lambda query: False)
    else:
        if attention_kernels.triton is None:
            pytest.skip("Triton is not installed")
        kernel = attention_kernels.attend_and_accumulate
        monkeypatch.setattr(
            attention_kernels,
            "attend_and_accumulate",
            lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs),
        )
    documents = random_documents([40, 29])
    press, resolved = build("h2o", 0.06, {"local_window": WINDOW, "sinks": 3}, surrogate_dir)
    for doc, result in zip(documents, stream_nll(model, documents, 32, press), strict=True):
        nll, counts, _ = reference_stream(weights, doc, 32, "h2o", 0.06, WINDOW, resolved["sinks"])
        assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)
        assert {k: result[k] for k in counts} == counts
    assert bool(calls) == (column_sums == "triton")


# Chunk 3: a pass of few rows (6 per KV head; decoding's and exact streaming's kernel settings).
@pytest.mark.parametrize(
    "case,chunk", [(CASES[0], 3), (CASES[3], 3), (CASES[3], 32)], ids=["kvzap-3", "h2o-3", "h2o-32"]
)
def test_every_pass_through_split_kernels_matches_reference(model, weights, surrogate_dir, monkeypatch, case, chunk):
    """As on a GPU: every pass attends through the Triton kernels, one-token passes included, and
    their keys are split over programs (shares of 16 keys, combined after). The NLL and kept counts
    hold the reference."""
    method, threshold, settings = case
    splits = every_pass_through_split_kernels(monkeypatch, interpreter_sms=16)  # chunk 32's 16 programs too
    documents = random_documents([40, 29])
    press, resolved = build(method, threshold, settings, surrogate_dir)
    for doc, result in zip(documents, stream_nll(model, documents, chunk, press), strict=True):
        nll, counts, _ = reference_stream(weights, doc, chunk, method, threshold, WINDOW, resolved["sinks"])
        assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)
        assert {k: result[k] for k in counts} == counts
    assert splits and max(splits) > 1, "no pass was split: the case does not test the combination"


@pytest.mark.parametrize("sms", [4, 64], ids=["rows-whole", "rows-split"])
def test_h2o_skips_the_sums_of_decided_keys_and_holds_the_reference(model, weights, surrogate_dir, monkeypatch, sms):
    """Column sums in blocks of 16 keys over documents of up to 100 tokens in chunks of 32: from the
    second pass on, the first blocks hold keys decided earlier only, and the kernel skips them. The
    keys decided in a pass must still get that pass's sums: NLL and kept counts hold the reference.
    With a GPU of 64 multiprocessors taken, the few programs over the undecided keys also split
    their rows into shares (as at batch 1 on a GPU), which are added up after."""
    if attention_kernels.triton is None:
        pytest.skip("Triton is not installed")
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(kernel_launches, "COLUMN_SUMS_LAUNCHES", (small,))
    monkeypatch.setattr(kernel_launches, "INTERPRETER_SMS", sms)
    shares = []
    row_splits = kernel_launches.row_splits
    monkeypatch.setattr(kernel_launches, "row_splits", lambda *args: shares.append(row_splits(*args)) or shares[-1])
    skipping = []
    kernel = attention_kernels.attend_and_accumulate

    def recording(*args, undecided_from=None, undecided_offset=0, **kwargs):
        skipping.append(int((undecided_from + undecided_offset).max()) >= 2 * small["BLOCK_N"])
        return kernel(*args, undecided_from=undecided_from, undecided_offset=undecided_offset, **kwargs)

    monkeypatch.setattr(attention_kernels, "attend_and_accumulate", recording)
    documents = random_documents([100, 77], seed=4)
    press, resolved = build("h2o", 0.02, {"local_window": WINDOW, "sinks": 3}, surrogate_dir)
    kept, total = 0, 0
    # Key buckets of one chunk: each pass's python bounds are its own slots, so the kernel launches
    # no programs below the first slot - window (a bucket of many chunks starts lower).
    results = stream_nll(model, documents, 32, press, key_bucket=32)
    for doc, result in zip(documents, results, strict=True):
        nll, counts, margins = reference_stream(weights, doc, 32, "h2o", 0.02, WINDOW, resolved["sinks"])
        assert min(margins) > 1e-5, "threshold too close to a score: the comparison would be fragile"
        assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)
        assert {k: result[k] for k in counts} == counts
        kept, total = kept + counts["kv_kept_compressible"], total + counts["kv_total_compressible"]
    assert 0.2 <= 1 - kept / total <= 0.8, f"the threshold evicts {1 - kept / total:.0%}: too few decisions to test"
    assert any(skipping), "no pass skipped a block: the documents are too short for the test"
    assert (max(shares) > 1) == (sms == 64), shares


@pytest.mark.slow  # the Triton interpreter: tens of seconds (make check skips it)
def test_an_h2o_scorer_with_its_own_score_is_asked(model, surrogate_dir, monkeypatch):
    """The decision kernel computes `H2OScorer.score` itself; a subclass that changes the score is
    asked instead. Here twice H2O's score: against twice the threshold it decides as H2O does,
    against the same threshold it evicts less (the kernel's own score would decide as H2O)."""
    every_pass_through_split_kernels(monkeypatch)

    class Doubled(H2OScorer):
        def score(self, *args):
            return 2 * super().score(*args)

    documents = random_documents([40, 29])

    def kept(scorer, threshold):
        press = StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=WINDOW)
        return [r["kv_kept"] for r in stream_nll(model, documents, 3, press)]

    h2o = kept(H2OScorer(), 0.06)
    assert kept(Doubled(), 0.12) == h2o
    assert kept(Doubled(), 0.06) != h2o


def test_baseline_matches_reference(model, weights):
    documents = random_documents([40, 29])
    for doc, result in zip(documents, stream_nll(model, documents, 5), strict=True):
        nll, counts, _ = reference_stream(weights, doc, 5, "baseline", None, 0, 0)
        assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)
        assert result["kv_kept"] == result["kv_total"] == counts["kv_total"]
        assert result["n_predicted"] == len(doc) - 1


@pytest.mark.parametrize("chunk", [1, 3, 16, 128])
@pytest.mark.parametrize("method", ["kvzap", "kvzap_no_sink", "h2o"])
def test_threshold_minus_inf_is_baseline(model, surrogate_dir, method, chunk):
    documents = random_documents([50, 31, 7])
    baseline = stream_nll(model, documents, chunk)
    settings = {"sliding_window": 4} if method.startswith("kvzap") else {"local_window": 4}
    press, _ = build(method, -math.inf, settings, surrogate_dir)
    for base, result in zip(baseline, stream_nll(model, documents, chunk, press), strict=True):
        assert result["nll_sum"] == pytest.approx(base["nll_sum"], rel=1e-5)
        assert result["kv_kept"] == result["kv_total"]


@pytest.mark.parametrize("method", ["kvzap", "kvzap_no_sink", "h2o"])
def test_density_falls_as_threshold_rises(model, surrogate_dir, method):
    documents = random_documents([60, 45])
    thresholds = [-1.0, -0.2, -0.05, 0.0, 0.03, 0.06, 0.1, 0.3, 1.0]
    settings = {"sliding_window": 4} if method.startswith("kvzap") else {"local_window": 4}
    densities = []
    for threshold in thresholds:
        press, _ = build(method, threshold, settings, surrogate_dir)
        results = stream_nll(model, documents, 8, press)
        densities.append(sum(r["kv_kept"] for r in results) / sum(r["kv_total"] for r in results))
    assert all(a >= b for a, b in pairwise(densities)), densities
    assert densities[0] > densities[-1], f"the sweep should change the density: {densities}"


@pytest.mark.parametrize(
    "method,settings", [("kvzap", {"sliding_window": 5}), ("h2o", {"local_window": 7, "sinks": 2})]
)
def test_sinks_and_window_are_never_evicted(model, surrogate_dir, method, settings):
    """At a threshold above every score each decided position is evicted; all that stays is sinks and the window."""
    documents = random_documents([40, 12])
    press, resolved = build(method, 1e30, settings, surrogate_dir)
    window = resolved.get("sliding_window", resolved.get("local_window"))
    for doc, result in zip(documents, stream_nll(model, documents, 3, press), strict=True):
        kv_per_position = result["kv_total"] // len(doc)
        assert result["kv_kept_compressible"] == 0
        assert result["kv_kept"] == kv_per_position * (resolved["sinks"] + window)


@pytest.mark.parametrize("method,threshold", [("kvzap", 0.0), ("h2o", 0.06)])
def test_batch_size_does_not_change_results(model, surrogate_dir, method, threshold):
    documents = random_documents([57, 20, 41, 9])
    settings = {"sliding_window": 4} if method == "kvzap" else {"local_window": 4}
    press, _ = build(method, threshold, settings, surrogate_dir)
    one_by_one = [stream_nll(model, [doc], 8, press)[0] for doc in documents]
    batched = stream_nll(model, documents, 8, press)
    for single, together in zip(one_by_one, batched, strict=True):
        assert together["nll_sum"] == pytest.approx(single["nll_sum"], rel=1e-5)
        assert {k: v for k, v in together.items() if k != "nll_sum"} == {
            k: v for k, v in single.items() if k != "nll_sum"
        }


def test_chunk_128_with_head_dim_32_runs(surrogate_dir, tmp_path):
    """kvpress's fake-key masking raises at this size; the masked attention must not."""
    model = tiny_llama(head_dim=32)
    tiny_surrogate(model).save_pretrained(tmp_path)
    documents = random_documents([400, 300])
    baseline = stream_nll(model, documents, 128)
    for method, threshold in [("kvzap", 0.0), ("h2o", 0.004)]:
        settings = {"sliding_window": 128} if method == "kvzap" else {"local_window": 128}
        press, _ = build(method, threshold, settings, str(tmp_path))
        results = stream_nll(model, documents, 128, press)
        for base, result in zip(baseline, results, strict=True):
            assert math.isfinite(result["nll_sum"])
            assert result["kv_kept"] < result["kv_total"], f"{method} evicted nothing"
            assert result["nll_sum"] != base["nll_sum"]


@pytest.mark.parametrize("family", ["qwen3", "mistral", "qwen2"])
def test_other_architectures(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        family,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        initializer_range=0.15,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    documents = random_documents([30, 19])
    baseline = stream_nll(model, documents, 4)
    press, _ = build("h2o", -math.inf, {"local_window": 4}, None)
    for base, result in zip(baseline, stream_nll(model, documents, 4, press), strict=True):
        assert result["nll_sum"] == pytest.approx(base["nll_sum"], rel=1e-5)
    press, _ = build("h2o", 0.06, {"local_window": 4}, None)
    assert sum(r["kv_kept"] for r in stream_nll(model, documents, 4, press)) < sum(r["kv_total"] for r in baseline)


def test_a_stock_kvpress_scorer_works_with_the_scorer_contract(model):
    """A stock kvpress ScorerPress is scored on entry (`PressScorer`): the same evictions as
    KnormScorer (KnormPress with the `StreamingScorer` contract mixed in); what is no scorer is
    refused in one line."""
    from kvpress import KnormPress

    from kvsweep.engine.press import StreamingThresholdPress
    from kvsweep.engine.scorers import KnormScorer

    with pytest.raises(TypeError, match="list is neither a kvpress ScorerPress nor"):
        StreamingThresholdPress([], threshold=0.0, sliding_window_size=4)
    documents = random_documents([40, 22])
    baseline = stream_nll(model, documents, 4)
    keep_all = StreamingThresholdPress(KnormScorer(), threshold=-math.inf, sliding_window_size=4)
    for base, result in zip(baseline, stream_nll(model, documents, 4, keep_all), strict=True):
        assert result["nll_sum"] == pytest.approx(base["nll_sum"], rel=1e-5)
    # KnormPress scores -||k||: a threshold at the median key norm evicts the keys with larger norms.
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([documents[0]]), past_key_values=cache)
    median = -float(torch.cat([layer.keys.norm(dim=-1).flatten() for layer in cache.layers]).median())
    results = stream_nll(
        model, documents, 4, StreamingThresholdPress(KnormScorer(), threshold=median, sliding_window_size=4)
    )
    assert all(0 < r["kv_kept"] < r["kv_total"] for r in results)
    stock = stream_nll(
        model, documents, 4, StreamingThresholdPress(KnormPress(), threshold=median, sliding_window_size=4)
    )
    assert stock == results


def test_returned_eviction_masks_match_the_counts(model, surrogate_dir):
    documents = random_documents([45, 30])
    press, resolved = build("kvzap", 0.0, {"sliding_window": WINDOW}, surrogate_dir)
    for doc, result in zip(documents, stream_nll(model, documents, 3, press, return_evicted=True), strict=True):
        evicted = result["evicted"]
        assert evicted.shape == (2, 2, len(doc))
        assert evicted.sum() == result["kv_total"] - result["kv_kept"] > 0
        assert not evicted[:, :, : resolved["sinks"]].any() and not evicted[:, :, len(doc) - WINDOW :].any()
    baseline = stream_nll(model, documents, 3, return_evicted=True)
    assert not any(r["evicted"].any() for r in baseline)


def test_static_passes_refuse_what_they_cannot_run(model):
    from kvsweep.engine.layout import BatchLayout
    from kvsweep.engine.passes import StaticPasses, default_bucket

    assert [default_bucket(c) for c in (1, 3, 16, 128)] == [256, 258, 256, 2048]  # whole chunks, >= 16 of them
    layout = BatchLayout.right_padded([list(range(10))], 12, "cpu")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        StaticPasses(model, layout, 3, key_bucket=4, cuda_graphs=True)
    passes = StaticPasses(model, layout, 3, key_bucket=4)  # on the CPU: eager
    ids = torch.zeros((1, 3), dtype=torch.long)
    with pytest.raises(ValueError, match=r"slots \[3, 6\) straddle a key bucket of 4"):
        passes.run(ids, ids, 3)
    with pytest.raises(ValueError, match=r"slots \[12, 15\) straddle a key bucket of 4 or the cache"):
        passes.run(ids, ids, 12)
