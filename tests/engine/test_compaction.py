"""The compacting cache against the masked engine, its reference: in kvpress's protocol, a context
compressed once and gathered into the entries it keeps gives the same greedy tokens, the same KV
counts and entries evicted per layer, and the same continuation loss (1e-5 relative, float32, CPU)
as the full cache with the evicted entries masked, for every method, at thresholds and at
compression ratios, in batches of documents of different lengths; and it holds only what is kept."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvsweep.demo import BUNDLED_MODEL
from kvsweep.demo.reports import generate_reports
from kvsweep.engine import compress_once
from kvsweep.engine.compress_once import compress_once_generate, compress_once_nll
from kvsweep.engine.methods import build_press
from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.study.methods import get_method

from conftest import every_pass_through_split_kernels, tiny_surrogate

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The bundled demo model in float32, its tokenizer, and a KVzap surrogate for it."""
    path = str(BUNDLED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    surrogate = tmp_path_factory.mktemp("surrogate")
    tiny_surrogate(model, seed=3).save_pretrained(surrogate)
    return model, AutoTokenizer.from_pretrained(path), str(surrogate)


def documents(tokenizer, lengths: list[int], seed: int = 5) -> tuple[list[list[int]], list[list[int]]]:
    """Contexts of the demo's reports cut to `lengths` words, and questions of different lengths."""
    reports = generate_reports(len(lengths), seed=seed)
    contexts = [tokenizer.encode(" ".join(r["report"].split()[:n])) for r, n in zip(reports, lengths, strict=True)]
    questions = [tokenizer.encode(" Summarize the report" + " briefly" * k + ".") for k in range(len(lengths))]
    return contexts, questions


def press_for(demo, name: str, threshold, settings: dict, ratio=None, safeguard=None) -> StreamingThresholdPress:
    model, _, surrogate = demo
    method = get_method(name)
    given = {**settings, **({"kvzap_surrogate": surrogate} if name.startswith("kvzap") else {})}
    resolved = method.resolve(threshold if ratio is None else (0.0 if method.takes_threshold else None), given)
    press = build_press(method, threshold, resolved, compression_ratio=ratio, adaptive_safeguard=safeguard)
    press.post_init_from_model(model)
    return press


# (method, threshold, settings, ratio, AdaKV safeguard): every method, at a threshold and at a ratio.
CASES = [
    ("kvzap", 0.0, {"sliding_window": 8, "sinks": 4}, None, None),
    ("kvzap_no_sink", -0.1, {"sliding_window": 16}, None, None),
    ("h2o", 0.02, {"local_window": 8, "sinks": 2}, None, None),
    ("observed_attention", 0.02, {"local_window": 16}, None, None),
    ("knorm", -3.0, {"sliding_window": 8, "sinks": 0}, None, None),
    ("random", 0.5, {"sliding_window": 8, "sinks": 4, "seed": 1}, None, None),
    ("expected_attention", 0.05, {"sliding_window": 8, "sinks": 4}, None, None),
    ("streaming_llm", None, {"sliding_window": 16, "sinks": 4}, None, None),
    ("knorm", None, {"sliding_window": 0, "sinks": 0}, 0.75, None),
    ("kvzap", None, {"sliding_window": 0, "sinks": 0}, 0.5, None),
    ("h2o", None, {"local_window": 0, "sinks": 0}, 0.6, None),
    ("expected_attention", None, {"sliding_window": 0}, 0.7, None),
    ("streaming_llm", None, {"sinks": 4}, 0.5, None),
    ("snapkv", None, {"window_size": 8}, 0.5, None),
    ("kvzip", None, {}, 0.5, None),
    ("knorm", None, {"sliding_window": 0, "sinks": 0}, 0.5, 0.2),
]
IDS = [f"{c[0]}-{'ratio' if c[3] is not None else 'threshold'}{'-adakv' if c[4] is not None else ''}" for c in CASES]


@pytest.mark.parametrize("name,threshold,settings,ratio,safeguard", CASES, ids=IDS)
def test_compacting_gives_what_masking_gives(demo, name, threshold, settings, ratio, safeguard):
    model, tokenizer, _ = demo
    contexts, questions = documents(tokenizer, [40, 120, 75])
    press = press_for(demo, name, threshold, settings, ratio, safeguard)
    eos = {model.generation_config.eos_token_id}
    masked = compress_once_generate(model, contexts, questions, NEW_TOKENS, press, eos_token_ids=eos, compact=False)
    compacted = compress_once_generate(model, contexts, questions, NEW_TOKENS, press, eos_token_ids=eos, compact=True)
    assert any(r["kv_kept"] < r["kv_total"] for r in masked), "nothing evicted: the comparison proves little"
    assert compacted == masked
    # Each document's context alone, compacted before the next (the cache grows for a wider one).
    grouped = compress_once_generate(
        model, contexts, questions, NEW_TOKENS, press, eos_token_ids=eos, compact=True, prefill_batch=1
    )
    assert grouped == masked

    masked = compress_once_nll(model, contexts, questions, press, compact=False)
    compacted = compress_once_nll(model, contexts, questions, press, compact=True)
    for ours, reference in zip(compacted, masked, strict=True):
        assert ours.pop("nll_sum") == pytest.approx(reference.pop("nll_sum"), rel=1e-5)
        assert ours == reference


@pytest.mark.parametrize("name,threshold,settings,ratio,decoding", [
    ("h2o", None, {"local_window": 0, "sinks": 0}, 0.6, False),
    ("knorm", -3.0, {"sliding_window": 8, "sinks": 0}, None, False),
    ("h2o", 0.03, {"local_window": 8, "sinks": 2}, None, True),
    ("kvzap", 0.0, {"sliding_window": 8, "sinks": 4}, None, True),
])  # fmt: skip
def test_compacting_gives_what_masking_gives_through_the_kernels(
    demo, monkeypatch, name, threshold, settings, ratio, decoding
):
    """Every pass through the Triton kernels (the GPU's path, under the interpreter: the attention,
    H2O's sums and the decisions in their kernels), keys split."""
    every_pass_through_split_kernels(monkeypatch)
    model, tokenizer, _ = demo
    contexts, questions = documents(tokenizer, [30, 70], seed=2)
    press = press_for(demo, name, threshold, settings, ratio)
    masked = compress_once_generate(model, contexts, questions, 6, press, decoding=decoding, compact=False)
    assert compress_once_generate(model, contexts, questions, 6, press, decoding=decoding, compact=True) == masked
    masked = compress_once_nll(model, contexts, questions, press, compact=False)
    for ours, reference in zip(compress_once_nll(model, contexts, questions, press, compact=True), masked, strict=True):
        assert ours["nll_sum"] == pytest.approx(reference["nll_sum"], rel=1e-5)


def test_the_compacted_cache_holds_the_widest_heads_kept_entries_only(demo):
    """At ratio 0.75, knorm keeps max(1, int(n / 4)) entries per head: the cache after compaction
    holds the longest context's share, the follow-up and the answer's slots, and a head of a
    shorter document hides the slots it does not fill."""
    model, tokenizer, _ = demo
    contexts, questions = documents(tokenizer, [40, 120, 75])
    press = press_for(demo, "knorm", None, {"sliding_window": 0, "sinks": 0}, 0.75)
    with compress_once._prefilled(
        model, press, contexts, questions, NEW_TOKENS, False, True, None, False, None
    ) as prefilled:
        compacted = prefilled.compacted
        kept = [max(1, int(len(c) * 0.25)) for c in contexts]
        width_follow = max(len(q) for q in questions)
        assert compacted.width == max(kept)
        for layer in compacted.passes.cache.layers:
            assert layer.keys.shape[2] == max(kept) + width_follow + NEW_TOKENS
        for state in press.layers.values():
            hidden = state.evicted[:, :, : compacted.width].sum(-1)
            assert hidden.tolist() == [[max(kept) - k] * state.evicted.shape[1] for k in kept]
    # keys and values, float32, per layer: batch x KV heads x slots x head dim
    config = model.config
    per_slot = 2 * 4 * len(contexts) * config.num_key_value_heads * config.head_dim * config.num_hidden_layers
    assert compacted.passes.kv_bytes() == (max(kept) + width_follow + NEW_TOKENS) * per_slot


def test_minus_inf_compacts_nothing_and_is_the_uncompressed_model(demo):
    model, tokenizer, _ = demo
    contexts, questions = documents(tokenizer, [40, 75])
    press = press_for(demo, "knorm", float("-inf"), {"sliding_window": 8, "sinks": 0})
    baseline = compress_once_generate(model, contexts, questions, NEW_TOKENS, None, compact=False)
    assert compress_once_generate(model, contexts, questions, NEW_TOKENS, None, compact=True) == baseline
    for ours, reference in zip(
        compress_once_generate(model, contexts, questions, NEW_TOKENS, press, compact=True), baseline, strict=True
    ):
        assert ours["generated_ids"] == reference["generated_ids"]
        assert ours["kv_kept"] == ours["kv_total"] == reference["kv_total"]


DECODING = [case for case in CASES if case[3] is None]  # thresholds: kvpress's DMSPress(decoding=True)


@pytest.mark.parametrize(
    "name,threshold,settings,ratio,safeguard", DECODING, ids=[f"{c[0]}-decoding" for c in DECODING]
)
def test_compacting_gives_what_masking_gives_while_decoding_compresses(
    demo, name, threshold, settings, ratio, safeguard
):
    """With eviction while decoding, the window's entries (at the same slots in every head, with
    their own positions) and the question's and answer's are decided as the masked engine decides
    them; only what the context's decision evicted is freed."""
    model, tokenizer, _ = demo
    contexts, questions = documents(tokenizer, [40, 120, 75])
    press = press_for(demo, name, threshold, settings)
    eos = {model.generation_config.eos_token_id}
    masked = compress_once_generate(
        model, contexts, questions, NEW_TOKENS, press, decoding=True, eos_token_ids=eos, compact=False
    )
    later = [sum(r["evicted_per_layer"]) for r in masked]
    before = compress_once_generate(model, contexts, questions, NEW_TOKENS, press, decoding=False, compact=False)
    assert later != [sum(r["evicted_per_layer"]) for r in before], "nothing evicted while decoding: proves little"
    for prefill_batch in (None, 1):
        compacted = compress_once_generate(
            model, contexts, questions, NEW_TOKENS, press, decoding=True, eos_token_ids=eos, compact=True,
            prefill_batch=prefill_batch,
        )  # fmt: skip
        assert compacted == masked
