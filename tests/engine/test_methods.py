"""The reference-point methods (StreamingLLM, random, Expected Attention, key norm, observed
attention) against the independent float64 reference (tests/reference.py), and their own
invariants: random's decisions do not depend on the batch, StreamingLLM keeps exactly sinks +
window, random at 0 is the baseline and at 1 is StreamingLLM."""

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kvsweep.engine.methods import build_press
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.kernels import expected_logits
from kvsweep.study.methods import get_method

from conftest import random_documents, tiny_llama
from reference import Weights, reference_stream

ROOT = Path(__file__).resolve().parents[2]
WINDOW, SINKS = 6, 2
DOCUMENTS = random_documents([40, 29, 35], seed=5)
# Expected Attention averages RoPE over fewer future positions here, to keep the reference quick.
SETTINGS = {
    "streaming_llm": {"sliding_window": WINDOW, "sinks": SINKS},
    "random": {"sliding_window": WINDOW, "sinks": SINKS, "seed": 7},
    "expected_attention": {"sliding_window": WINDOW, "sinks": SINKS, "n_future_positions": 32},
    "knorm": {"sliding_window": WINDOW, "sinks": SINKS},
    # H2O's score with its own window (128 by default; shortened to fit the test documents).
    "observed_attention": {"local_window": WINDOW, "sinks": SINKS},
}


def press_of(method, threshold, settings):
    spec = get_method(method)
    resolved = spec.resolve(threshold if spec.takes_threshold else None, settings)
    return build_press(spec, threshold if spec.takes_threshold else None, resolved), resolved


@functools.cache
def threshold_between_scores(method: str) -> float:
    """A threshold halfway between two neighbouring decision scores near their median (scores when
    nothing is evicted): it evicts a good share and lies away from every score."""
    if method == "random":
        return 0.5
    spec = get_method(method)
    settings = spec.resolve(0.0, SETTINGS[method])
    press = build_press(spec, -math.inf, settings)
    press.record_decisions = True
    results = stream_nll(tiny_llama(), DOCUMENTS, 5, press, return_decision_scores=True)
    scores = np.sort(np.concatenate([r["decision_scores"].ravel() for r in results]))
    middle = len(scores) // 2
    return float((scores[middle] + scores[middle + 1]) / 2)


@functools.cache
def reference(method: str, chunk: int, doc: int):
    options = SETTINGS[method]
    threshold = None if method == "streaming_llm" else threshold_between_scores(method)
    return reference_stream(
        Weights(tiny_llama()), DOCUMENTS[doc], chunk, method, threshold, WINDOW, SINKS, options=options
    )


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("chunk", [1, 5, 32])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_matches_reference(model, method, chunk, batch):
    threshold = None if method == "streaming_llm" else threshold_between_scores(method)
    groups = [list(range(len(DOCUMENTS)))] if batch == 3 else [[i] for i in range(len(DOCUMENTS))]
    for group in groups:
        press, _ = press_of(method, threshold, SETTINGS[method])
        results = stream_nll(model, [DOCUMENTS[i] for i in group], chunk, press)
        for i, result in zip(group, results, strict=True):
            nll, counts, margins = reference(method, chunk, i)
            if margins:
                assert min(margins) > 1e-6, "threshold too close to a score: the comparison would be fragile"
            assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)
            assert {k: result[k] for k in counts} == counts
            evicted = 1 - counts["kv_kept_compressible"] / counts["kv_total_compressible"]
            assert 0.2 <= evicted <= 1.0 if method == "streaming_llm" else 0.2 <= evicted <= 0.8, evicted


def evicted_masks(model, method, threshold, settings, documents, chunk=5):
    press, _ = press_of(method, threshold, settings)
    return [r["evicted"] for r in stream_nll(model, documents, chunk, press, return_evicted=True)]


@pytest.mark.parametrize("chunk", [1, 7])
def test_random_decisions_do_not_depend_on_the_batch(model, chunk):
    settings = SETTINGS["random"]
    together = evicted_masks(model, "random", 0.5, settings, DOCUMENTS, chunk)
    other_company = evicted_masks(model, "random", 0.5, settings, [DOCUMENTS[2], DOCUMENTS[0]], chunk + 2)
    alone = [evicted_masks(model, "random", 0.5, settings, [doc], chunk)[0] for doc in DOCUMENTS]
    for mask, single in zip(together, alone, strict=True):
        assert np.array_equal(mask, single)
    assert np.array_equal(other_company[0], alone[2]) and np.array_equal(other_company[1], alone[0])
    # Another seed gives other decisions.
    reseeded = evicted_masks(model, "random", 0.5, {**settings, "seed": 8}, DOCUMENTS, chunk)
    assert not np.array_equal(reseeded[0], together[0])


@pytest.mark.parametrize("window,sinks", [(6, 2), (0, 4), (10, 0)])
def test_streaming_llm_keeps_exactly_sinks_and_window(model, window, sinks):
    press, _ = press_of("streaming_llm", None, {"sliding_window": window, "sinks": sinks})
    results = stream_nll(model, DOCUMENTS, 3, press, return_evicted=True)
    for doc, result in zip(DOCUMENTS, results, strict=True):
        kept = ~result["evicted"]
        n = len(doc)
        expected = np.zeros(n, dtype=bool)
        expected[:sinks] = True
        expected[max(n - window, 0) :] = True
        assert (kept == expected).all()


def test_random_at_0_is_baseline_and_at_1_is_streaming_llm(model):
    baseline = stream_nll(model, DOCUMENTS, 5)
    settings = SETTINGS["random"]
    at_zero = stream_nll(model, DOCUMENTS, 5, press_of("random", 0.0, settings)[0])
    at_one = stream_nll(model, DOCUMENTS, 5, press_of("random", 1.0, settings)[0], return_evicted=True)
    streaming = press_of("streaming_llm", None, {"sliding_window": WINDOW, "sinks": SINKS})[0]
    streaming_llm = stream_nll(model, DOCUMENTS, 5, streaming, return_evicted=True)
    for base, zero, one, stream in zip(baseline, at_zero, at_one, streaming_llm, strict=True):
        assert zero["nll_sum"] == pytest.approx(base["nll_sum"], rel=1e-6) and zero["kv_kept"] == zero["kv_total"]
        assert np.array_equal(one["evicted"], stream["evicted"])
        assert one["nll_sum"] == pytest.approx(stream["nll_sum"], rel=1e-6)


@pytest.mark.parametrize("method", ["expected_attention", "knorm"])
def test_threshold_minus_inf_is_baseline(model, method):
    baseline = stream_nll(model, DOCUMENTS, 4)
    press, _ = press_of(method, -math.inf, SETTINGS[method])
    for base, result in zip(baseline, stream_nll(model, DOCUMENTS, 4, press), strict=True):
        assert result["nll_sum"] == pytest.approx(base["nll_sum"], rel=1e-6)
        assert result["kv_kept"] == result["kv_total"]


@pytest.mark.parametrize("method", ["expected_attention", "knorm", "random"])
def test_density_falls_as_threshold_rises(model, method):
    middle = threshold_between_scores(method)
    spread = abs(middle) + 1.0
    densities = []
    for threshold in np.linspace(middle - spread, middle + spread, 7):
        press, _ = press_of(method, float(threshold), SETTINGS[method])
        results = stream_nll(model, DOCUMENTS, 8, press)
        densities.append(sum(r["kv_kept"] for r in results) / sum(r["kv_total"] for r in results))
    assert densities == sorted(densities, reverse=True) and densities[0] > densities[-1], densities


def test_observed_attention_is_h2o_with_the_dms_window(model):
    """At its defaults, observed_attention is H2O with a 128-token window (not H2O's 512)."""
    observed, h2o = get_method("observed_attention"), get_method("h2o")
    assert observed.defaults == {**h2o.defaults, "local_window": 128}
    documents = random_documents([300, 220], seed=6)
    at_default, _ = press_of("observed_attention", 0.01, {})
    h2o_128, _ = press_of("h2o", 0.01, {"local_window": 128})
    h2o_512, _ = press_of("h2o", 0.01, {})
    default, same = stream_nll(model, documents, 16, at_default), stream_nll(model, documents, 16, h2o_128)
    assert default == same and default[0]["kv_kept"] < default[0]["kv_total"]
    assert stream_nll(model, documents, 16, h2o_512)[0]["kv_kept"] == default[0]["kv_total"]  # 512 > 300


def test_adding_a_method_as_the_contributing_guide_says(tmp_path, model_dir):
    """docs/contributing.md's "Adding a method": its declaration and scorer as new files, its
    builder and the two registry lines, is a method that the table lists, a config accepts and
    `kvsweep evaluate` runs."""
    guide = (ROOT / "docs" / "contributing.md").read_text().split("## Adding a method")[1].split("\n## ")[0]
    declaration, scorer, builder = re.findall(r"```python\n(.*?)```", guide, re.S)
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "kvsweep", src / "kvsweep", ignore=shutil.ignore_patterns("__pycache__"))
    for code in (declaration, scorer):
        (src / code.splitlines()[0].removeprefix("# src/")).write_text(code)
    registry = src / "kvsweep" / "study" / "methods" / "registry.py"
    registry.write_text(registry.read_text().replace('    "knorm",\n', '    "knorm",\n    "value_norm",\n'))
    builders = src / "kvsweep" / "engine" / "methods.py"
    text = builders.read_text().replace("# Method family -> builder", builder + "\n\n# Method family -> builder")
    builders.write_text(text.replace('    "knorm": knorm,\n', '    "knorm": knorm,\n    "value_norm": value_norm,\n'))
    env = {**os.environ, "PYTHONPATH": str(src)}

    def run(*args):
        result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    assert "| `value_norm` | `thresholds`: the value norm, in [0, inf] | `sliding_window` (128), `sinks` (0) |" in run(
        "kvsweep", "methods"
    )
    config = yaml.safe_load((ROOT / "demo" / "config.yaml").read_text())
    config["methods"] = {"baseline": None, "value_norm": {"thresholds": [0.5], "sinks": 2}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    assert (
        "value_norm:\n    type: value_norm\n    thresholds:\n    - 0.5\n    sliding_window: 128\n    sinks: 2"
        in run("kvsweep", "config", "study.yaml")
    )
    documents = random_documents([30, 21], seed=3)
    (tmp_path / "shard.jsonl").write_text("".join(json.dumps({"id": str(i), "input_ids": d}) + "\n"
                                                  for i, d in enumerate(documents)))  # fmt: skip
    # Above every value norm: everything outside the 2 sinks and the 4-token window goes.
    run("kvsweep", "evaluate", "--model", str(model_dir), "--data", "shard.jsonl", "--method", "value_norm",
        "--threshold", "1e9", "--sliding-window", "4", "--sinks", "2", "--chunk-size", "3", "--max-length", "64",
        "--device", "cpu", "--dtype", "float32", "--output", "out.jsonl")  # fmt: skip
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for doc, result in zip(documents, results, strict=True):
        assert result["kv_kept"] == result["kv_total"] // len(doc) * 6


@pytest.mark.parametrize("logits", ["triton", "torch"])
def test_expected_attention_logits_either_way_match_reference(model, monkeypatch, logits):
    """The logits of every key come from the Triton kernel where it runs (on the CPU through
    Triton's interpreter), else from torch ops; both hold the reference."""
    calls = []
    if logits == "torch":
        monkeypatch.setattr(expected_logits, "supports", lambda keys: False)
    else:
        if expected_logits.triton is None:
            pytest.skip("Triton is not installed")
        kernel = expected_logits.expected_logits
        monkeypatch.setattr(expected_logits, "expected_logits", lambda *a: calls.append(1) or kernel(*a))
    threshold = threshold_between_scores("expected_attention")
    press, _ = press_of("expected_attention", threshold, SETTINGS["expected_attention"])
    for i, result in enumerate(stream_nll(model, DOCUMENTS, 5, press)):
        nll, counts, _ = reference("expected_attention", 5, i)
        assert result["nll_sum"] == pytest.approx(nll, rel=1e-6)
        assert {k: result[k] for k in counts} == counts
    assert bool(calls) == (logits == "triton")


def test_expected_attention_statistics_keep_a_small_spread_around_a_large_mean(monkeypatch):
    """Queries with a large mean and a small spread, streamed one per pass: the running covariance
    is the float64 one. (The raw sums of q and q q' in float32 lose it: checked below on the same
    queries, so the input is one that tells the two apart.)"""
    from kvsweep.engine.scorers import expected_attention as module

    rng = np.random.default_rng(0)
    queries = (30 + 0.3 * rng.standard_normal((4096, 4))).astype(np.float32)
    monkeypatch.setattr(module, "get_prerope_query_states", lambda attention, hidden: hidden[:, None])
    scorer = module.ExpectedAttentionScorer()
    layout = type("Layout", (), {"position": torch.zeros(1, 1)})()
    attention = type("Attention", (), {"config": type("Config", (), {"num_attention_heads": 1})(), "head_dim": 4})()
    stats = scorer.allocate(attention, layout)
    for q in torch.from_numpy(queries):
        scorer.observe(attention, q[None, None, :], stats, torch.ones(1, 1))
    expected = np.cov(queries.astype(np.float64), rowvar=False, bias=True)
    covariance = (stats["spread"] / stats["count"]).double().numpy()[0, 0]
    assert np.abs(covariance - expected).max() / np.abs(expected).max() < 1e-3
    assert np.allclose(stats["mean"].double().numpy()[0, 0], queries.astype(np.float64).mean(0), rtol=1e-5)
    raw_sum, raw_outer = torch.zeros(4), torch.zeros(4, 4)
    for q in torch.from_numpy(queries):
        raw_sum += q
        raw_outer += q[:, None] * q[None, :]
    raw = (raw_outer / 4096 - (raw_sum / 4096)[:, None] * (raw_sum / 4096)[None, :]).double().numpy()
    assert np.abs(raw - expected).max() / np.abs(expected).max() > 1e-2
