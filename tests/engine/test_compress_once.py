"""kvpress's protocol (prefill whole, compress once) against kvpress itself: the same greedy tokens
and the same entries evicted per layer as `pipeline("kv-press-text-generation", press=DMSPress(...))`
on the bundled demo model, float32 on the CPU; and the continuation's loss as kvpress's masked
cache gives it."""

import pytest
import torch
from kvpress import DMSPress, KnormPress, KVzapPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

from kvsweep.demo import BUNDLED_MODEL
from kvsweep.demo.reports import generate_reports
from kvsweep.engine.compress_once import compress_once_generate, compress_once_nll, kvpress_evicted_per_layer
from kvsweep.engine.methods import knorm, kvzap
from kvsweep.engine.stream_nll import stream_nll

from conftest import random_documents, tiny_surrogate

QUESTION = "Now, write a one-page summary of the report."
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def demo():
    path = str(BUNDLED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="module")
def surrogate(demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("demo_surrogate")
    tiny_surrogate(demo[0], seed=3).save_pretrained(path)
    return str(path)


def contexts_of(lengths: list[int]) -> list[str]:
    """Report openings of about `lengths` words each (the demo's reports, cut)."""
    reports = generate_reports(len(lengths), seed=5)
    return [" ".join(report["report"].split()[:n]) for report, n in zip(reports, lengths, strict=True)]


def kvpress_press(name: str, threshold: float, window: int, decoding: bool, surrogate: str | None, model):
    if name == "kvzap":
        scorer = KVzapPress(model_type="mlp")
        # The surrogate by hand (KVzapPress would fetch nvidia/KVzap-mlp-<model> from the hub).
        scorer.kvzap_model = type(tiny_surrogate(model)).from_pretrained(surrogate)
        scorer.kvzap_model_name = f"nvidia/KVzap-mlp-{model.config.name_or_path.split('/')[-1]}"
    else:
        scorer = KnormPress()
    return DMSPress(scorer, threshold=threshold, sliding_window_size=window, decoding=decoding)


def kvsweep_press(name: str, threshold: float, window: int, surrogate: str | None):
    if name == "kvzap":  # kvpress's DMSPress has no sinks: kvzap_no_sink's semantics
        return kvzap(threshold, window, 0, surrogate, "mlp")
    return knorm(threshold, window, 0)


def pipeline_ids(pipe, context: str, question: str):
    """The context's and the question's token ids exactly as kvpress's pipeline makes them."""
    tensors = pipe.preprocess(context, questions=[question], answer_prefix="", max_context_length=10**9)
    return tensors["context_ids"][0].tolist(), tensors["questions_ids"][0][0].tolist()


# (method, threshold, window): each evicts a good share of the context and keeps some of it.
SETTINGS = [("kvzap", 0.0, 8), ("kvzap", -0.1, 16), ("knorm", -3.0, 8)]


@pytest.mark.parametrize("decoding", [False, True], ids=["prefill_only", "decoding"])
@pytest.mark.parametrize("name,threshold,window", SETTINGS)
def test_the_same_tokens_and_evictions_as_kvpress_pipeline(demo, surrogate, name, threshold, window, decoding):
    model, tokenizer, pipe = demo
    contexts = contexts_of([60, 95, 130])
    eos = {model.generation_config.eos_token_id}
    ids = [pipeline_ids(pipe, context, QUESTION) for context in contexts]
    ours = compress_once_generate(
        model, [c for c, _ in ids], [q for _, q in ids], NEW_TOKENS, kvsweep_press(name, threshold, window, surrogate),
        decoding=decoding, eos_token_ids=eos,
    )  # fmt: skip
    evicted_somewhere = False
    for context, result in zip(contexts, ours, strict=True):
        press = kvpress_press(name, threshold, window, decoding, surrogate, model)
        answer = pipe(context, question=QUESTION, press=press, max_new_tokens=NEW_TOKENS)["answer"]
        masked = kvpress_evicted_per_layer(model)
        assert tokenizer.decode(result["generated_ids"], skip_special_tokens=True) == answer
        assert result["evicted_per_layer"] == masked
        evicted_somewhere |= sum(masked) > 0
        kept = result["kv_total"] - sum(masked)
        assert result["kv_kept"] == kept
    assert evicted_somewhere, "the setting evicts nothing: the comparison would prove little"


# Every method family, at settings that evict part of the context (h2o: mean attention received;
# expected_attention: scored at decision time; random: keyed by document; streaming_llm: +inf).
BATCHED = [
    ("kvzap", 0.0, {"sliding_window": 8, "sinks": 4, "kvzap_type": "mlp"}),
    ("h2o", 0.01, {"local_window": 8, "sinks": 0}),
    ("expected_attention", 0.05, {"sliding_window": 8, "sinks": 4}),
    ("random", 0.5, {"sliding_window": 8, "sinks": 4, "seed": 1}),
    ("streaming_llm", None, {"sliding_window": 16, "sinks": 4}),
    ("knorm", -3.0, {"sliding_window": 8, "sinks": 0}),
]


@pytest.mark.parametrize("decoding", [False, True], ids=["prefill_only", "decoding"])
@pytest.mark.parametrize("name,threshold,settings", BATCHED, ids=[b[0] for b in BATCHED])
def test_a_batch_gives_what_each_document_gives_alone(demo, surrogate, name, threshold, settings, decoding):
    from kvsweep.engine.methods import build_press
    from kvsweep.study.methods import get_method

    model, _, pipe = demo
    method = get_method(name)
    resolved = method.resolve(threshold, {**settings, **({"kvzap_surrogate": surrogate} if name == "kvzap" else {})})
    press = build_press(method, threshold, resolved)
    press.post_init_from_model(model)
    ids = [pipeline_ids(pipe, context, QUESTION) for context in contexts_of([40, 120, 75])]
    together = compress_once_generate(
        model, [c for c, _ in ids], [q for _, q in ids], NEW_TOKENS, press, decoding=decoding
    )
    assert any(r["kv_kept"] < r["kv_total"] for r in together), "nothing evicted: the comparison proves little"
    for (context, question), batched in zip(ids, together, strict=True):
        alone = compress_once_generate(model, [context], [question], NEW_TOKENS, press, decoding=decoding)[0]
        assert alone == batched


@pytest.mark.parametrize("stop_at", [0, 3])
def test_the_end_of_sequence_is_looked_for_as_kvpress_does(demo, surrogate, stop_at):
    """kvpress keeps the first token whatever it is and stops at a later end-of-sequence token:
    make the token the model writes at step `stop_at` the end-of-sequence token, on both sides."""
    model, tokenizer, pipe = demo
    context_ids, question_ids = pipeline_ids(pipe, contexts_of([80])[0], QUESTION)
    free = compress_once_generate(model, [context_ids], [question_ids], NEW_TOKENS)[0]["generated_ids"]
    end = free[stop_at]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = end
    try:
        answer = pipe(contexts_of([80])[0], question=QUESTION, max_new_tokens=NEW_TOKENS)["answer"]
        ours = compress_once_generate(model, [context_ids], [question_ids], NEW_TOKENS, eos_token_ids={end})[0]
    finally:
        model.generation_config.eos_token_id = saved
    # kvpress keeps tokens up to and including the first end after step 0 (a plain word here, which
    # its decoding keeps); kvsweep keeps them without that end.
    later = [k for k in range(1, len(free)) if free[k] == end]
    kvpress_ids = free[: later[0] + 1] if later else free
    assert answer == tokenizer.decode(kvpress_ids, skip_special_tokens=True)
    assert ours["generated_ids"] == (kvpress_ids[:-1] if later else kvpress_ids)
    assert ours["generated_ids"][0] == end if stop_at == 0 else len(ours["generated_ids"]) == stop_at


def test_threshold_minus_inf_is_the_uncompressed_model(demo, surrogate):
    model, _, pipe = demo
    ids = [pipeline_ids(pipe, context, QUESTION) for context in contexts_of([50, 90])]
    contexts, questions = [c for c, _ in ids], [q for _, q in ids]
    plain = compress_once_generate(model, contexts, questions, NEW_TOKENS)
    minus_inf = compress_once_generate(
        model, contexts, questions, NEW_TOKENS, kvsweep_press("kvzap", float("-inf"), 8, surrogate), decoding=True
    )
    for (context, question), a, b in zip(ids, plain, minus_inf, strict=True):
        assert a["generated_ids"] == b["generated_ids"] and b["kv_kept"] == b["kv_total"]
        greedy = model.generate(torch.tensor([context + question]), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert a["generated_ids"] == greedy[0, len(context) + len(question) :].tolist()[: a["n_generated"]]


@pytest.mark.parametrize("name,threshold,window", SETTINGS)
def test_the_continuations_loss_is_kvpress_masked_caches(demo, surrogate, name, threshold, window):
    """The reference: kvpress's DMSPress during the context's pass (masking by fake keys), then the
    model's plain forward over the continuation with that cache, one token at a time (kvpress's
    fake-key search fails for a pass of several queries on this model: `search_hyperplane`)."""
    model, tokenizer, _ = demo
    texts = contexts_of([70, 110])
    contexts = [tokenizer.encode(t)[:-10] for t in texts]
    continuations = [tokenizer.encode(t)[-10:] for t in texts]
    ours = compress_once_nll(model, contexts, continuations, kvsweep_press(name, threshold, window, surrogate))
    for context, continuation, result in zip(contexts, continuations, ours, strict=True):
        cache = DynamicCache()
        with torch.inference_mode():
            with kvpress_press(name, threshold, window, False, surrogate, model)(model):
                logits = [model(torch.tensor([context]), past_key_values=cache).logits[0, -1]]
            for k, token in enumerate(continuation[:-1]):
                position = torch.tensor([[len(context) + k]])
                logits.append(
                    model(torch.tensor([[token]]), past_key_values=cache, position_ids=position).logits[0, -1]
                )
        reference = torch.nn.functional.cross_entropy(torch.stack(logits), torch.tensor(continuation), reduction="sum")
        assert sum(kvpress_evicted_per_layer(model)) > 0 and sum(result["evicted_per_layer"]) > 0
        assert result["nll_sum"] == pytest.approx(float(reference), rel=1e-5)
        assert result["n_predicted"] == len(continuation)


def test_without_eviction_the_loss_is_the_streamed_documents(model):
    """Nothing evicted: the continuation's loss is the plain model's on context + continuation,
    which `stream_nll` gives token by token."""
    documents = random_documents([30, 47])
    ours = compress_once_nll(model, [d[:20] for d in documents], [d[20:] for d in documents])
    for document, result in zip(documents, ours, strict=True):
        with torch.inference_mode():
            logits = model(torch.tensor([document])).logits[0, 19:-1]
        reference = torch.nn.functional.cross_entropy(logits, torch.tensor(document[20:]), reduction="sum")
        assert result["nll_sum"] == pytest.approx(float(reference), rel=1e-5)
        streamed = stream_nll(model, [document], chunk_size=1)[0]
        assert streamed["kv_total"] == result["kv_total"]


# kvpress's budgets: `compression_ratio` on a ScorerPress, the share of the context evicted, per
# KV head, lowest scores first (kvsweep: `StreamingThresholdPress.fixed_ratio`, no window, no sinks).
RATIOS = [("knorm", 0.3), ("knorm", 0.75), ("kvzap", 0.5)]


def ratio_press(model, name: str, given: dict, ratio: float, safeguard: float | None = None):
    """kvsweep's press for method `name` with settings `given` at a fixed ratio (AdaKV's budget
    with `safeguard`), ready for `model`."""
    from kvsweep.engine.methods import build_press
    from kvsweep.study.methods import get_method

    method = get_method(name)
    resolved = method.resolve(0.0 if method.takes_threshold else None, given)
    press = build_press(method, None, resolved, compression_ratio=ratio, adaptive_safeguard=safeguard)
    press.post_init_from_model(model)
    return press


def beside_kvpress_pipeline(demo, press, upstream, kvpress_pipe=None):
    """kvsweep's greedy answers to three demo contexts, batched, with `press`, each beside the
    answer of kvpress's pipeline (`kvpress_pipe`, default the demo's) with a fresh `upstream()`:
    per context, (context ids, question ids, kvsweep's result, its text, kvpress's text, the entries
    kvpress masked per layer)."""
    model, tokenizer, pipe = demo
    contexts = contexts_of([60, 95, 130])
    ids = [pipeline_ids(pipe, context, QUESTION) for context in contexts]
    eos = {model.generation_config.eos_token_id}
    ours = compress_once_generate(model, [c for c, _ in ids], [q for _, q in ids], NEW_TOKENS, press, eos_token_ids=eos)
    for context, (context_ids, question_ids), result in zip(contexts, ids, ours, strict=True):
        answer = (kvpress_pipe or pipe)(context, question=QUESTION, press=upstream(), max_new_tokens=NEW_TOKENS)
        text = tokenizer.decode(result["generated_ids"], skip_special_tokens=True)
        yield context_ids, question_ids, result, text, answer["answer"], kvpress_evicted_per_layer(model)


def evicted_at_ratio(n: int, ratio: float, kv_heads: int) -> int:
    """The entries kvpress's ScorerPress evicts from a layer of n positions (`kvpress.utils.compute_n_kept`)."""
    return (n - max(1, int(n * (1 - ratio)))) * kv_heads


def kvpress_scorer(name: str, ratio: float, surrogate: str, model):
    """kvpress's scorer press for `name` (KnormPress, KVzapPress with the test's surrogate) at `ratio`."""
    scorer = kvpress_press(name, 0.0, 0, False, surrogate, model).press
    scorer.compression_ratio = ratio
    return scorer


@pytest.mark.parametrize("name,ratio", RATIOS)
def test_a_fixed_ratio_keeps_what_kvpress_scorer_press_keeps(demo, surrogate, name, ratio):
    model = demo[0]
    given = {"sliding_window": 0, "sinks": 0, **({"kvzap_surrogate": surrogate} if name == "kvzap" else {})}
    press = ratio_press(model, name, given, ratio)
    upstream = lambda: kvpress_scorer(name, ratio, surrogate, model)  # noqa: E731
    for context_ids, _, result, text, answer, _ in beside_kvpress_pipeline(demo, press, upstream):
        assert text == answer
        evicted = evicted_at_ratio(len(context_ids), ratio, model.config.num_key_value_heads)
        assert result["evicted_per_layer"] == [evicted] * model.config.num_hidden_layers and evicted > 0


def test_lowest_scored_is_the_slow_selection():
    """Per document and head, the n - max(1, int(n (1 - r))) lowest scores among the positions
    deciding (all of them if fewer), against a plain loop; slots need not be positions."""
    from kvsweep.engine.press import lowest_scored

    generator = torch.Generator().manual_seed(0)
    scores = torch.stack([torch.randperm(40, generator=generator).float() for _ in range(6)]).view(3, 2, 40)
    position = torch.arange(40).repeat(3, 1)
    position[1] = torch.arange(40).roll(7)  # slot j holds position j - 7 (mod 40)
    position[2, 9:] = -1  # padding
    tokens = torch.tensor([40, 40, 9])
    deciding = (position >= 2) & (position < (tokens - 8)[:, None])
    deciding[2] = (position[2] >= 1) & (position[2] < 3)
    for ratio in (0.0, 0.25, 0.5, 0.9):
        chosen = lowest_scored(scores, deciding, position, tokens, ratio)
        for b in range(3):
            n = int(tokens[b])
            wanted = min(n - max(1, int(n * (1 - ratio))), int(deciding[b].sum()))
            for h in range(2):
                candidates = [j for j in range(40) if deciding[b, j]]
                expected = sorted(candidates, key=lambda j: float(scores[b, h, j]))[:wanted]
                assert sorted(torch.nonzero(chosen[b, h]).flatten().tolist()) == sorted(expected)


@pytest.mark.parametrize("name,settings", [(b[0], b[2]) for b in BATCHED if b[0] != "streaming_llm"],
                         ids=[b[0] for b in BATCHED if b[0] != "streaming_llm"])  # fmt: skip
def test_a_fixed_ratio_batch_gives_what_each_document_gives_alone_and_ratio_0_evicts_nothing(
    demo, surrogate, name, settings
):
    model, _, pipe = demo
    given = {**settings, **({"kvzap_surrogate": surrogate} if name == "kvzap" else {})}
    ids = [pipeline_ids(pipe, context, QUESTION) for context in contexts_of([40, 120, 75])]
    contexts, questions = [c for c, _ in ids], [q for _, q in ids]
    press = ratio_press(model, name, given, 0.6)
    together = compress_once_generate(model, contexts, questions, NEW_TOKENS, press)
    for context, question, batched in zip(contexts, questions, together, strict=True):
        alone = compress_once_generate(model, [context], [question], NEW_TOKENS, press)[0]
        assert alone == batched
        # 60% of the context, taken from [sinks, n - window) only.
        region = len(context) - settings.get("sinks", 0) - settings.get("sliding_window", settings.get("local_window"))
        per_head = min(len(context) - max(1, int(len(context) * 0.4)), region)
        assert batched["evicted_per_layer"] == [per_head * model.config.num_key_value_heads] * len(
            batched["evicted_per_layer"]
        )
    nothing = ratio_press(model, name, given, 0.0)
    plain = compress_once_generate(model, contexts, questions, NEW_TOKENS)
    for a, b in zip(plain, compress_once_generate(model, contexts, questions, NEW_TOKENS, nothing), strict=True):
        assert a["generated_ids"] == b["generated_ids"] and b["kv_kept"] == b["kv_total"]
    with pytest.raises(ValueError, match="no decoding"):
        compress_once_generate(model, contexts, questions, NEW_TOKENS, press, decoding=True)


@pytest.mark.parametrize("ratio,window_size,kernel_size", [(0.5, 8, 5), (0.7, 16, 3)])
def test_snapkv_keeps_what_kvpress_snapkv_press_keeps(demo, ratio, window_size, kernel_size):
    """kvpress's own SnapKV score, per document of a batch: the same tokens as kvpress's pipeline
    with `SnapKVPress`, the same count evicted per layer, and a batch gives what each document gives
    alone."""
    from kvpress import SnapKVPress

    model = demo[0]
    press = ratio_press(model, "snapkv", {"window_size": window_size, "kernel_size": kernel_size}, ratio)
    upstream = lambda: SnapKVPress(compression_ratio=ratio, window_size=window_size, kernel_size=kernel_size)  # noqa: E731
    for context_ids, question_ids, result, text, answer, _ in beside_kvpress_pipeline(demo, press, upstream):
        assert text == answer
        evicted = evicted_at_ratio(len(context_ids), ratio, model.config.num_key_value_heads)
        assert result["evicted_per_layer"] == [evicted] * model.config.num_hidden_layers and evicted > 0
        eos = {model.generation_config.eos_token_id}
        alone = compress_once_generate(model, [context_ids], [question_ids], NEW_TOKENS, press, eos_token_ids=eos)
        assert alone[0] == result


def test_snapkv_refuses_a_context_no_longer_than_its_window_and_a_threshold(demo):
    from kvsweep.core.errors import KvsweepError
    from kvsweep.engine.methods import build_press
    from kvsweep.study.methods import get_method

    model, _, pipe = demo
    method = get_method("snapkv")
    settings = method.resolve(0.0, {"window_size": 64})
    press = ratio_press(model, "snapkv", {"window_size": 64}, 0.5)
    context, question = pipeline_ids(pipe, contexts_of([30])[0], QUESTION)
    assert len(context) <= 64
    with pytest.raises(KvsweepError, match=f"a context of {len(context)} tokens is not longer than window_size 64"):
        compress_once_generate(model, [context], [question], NEW_TOKENS, press)
    with pytest.raises(ValueError, match="compression ratio only"):
        build_press(method, 0.1, settings)


@pytest.mark.parametrize("ratio", [0.4, 0.8])
def test_h2o_at_a_fixed_ratio_keeps_what_kvpress_observed_attention_press_keeps(demo, ratio):
    """H2O's score in kvpress's protocol is kvpress's `ObservedAttentionPress` score: the mean
    attention each context key received from the context's queries that see it, over the query
    heads of its group (kvpress computes it from eager attention weights, kvsweep inside its
    masked attention): at a compression ratio, with no window and no sinks, the same tokens."""
    from kvpress import ObservedAttentionPress

    model, tokenizer, _ = demo
    eager = AutoModelForCausalLM.from_pretrained(str(BUNDLED_MODEL), dtype=torch.float32, attn_implementation="eager")
    eager_pipe = pipeline("kv-press-text-generation", model=eager.eval(), tokenizer=tokenizer, device="cpu")
    press = ratio_press(model, "h2o", {"local_window": 0, "sinks": 0}, ratio)
    upstream = lambda: ObservedAttentionPress(compression_ratio=ratio)  # noqa: E731
    for context_ids, _, result, text, answer, _ in beside_kvpress_pipeline(demo, press, upstream, eager_pipe):
        assert text == answer
        evicted = evicted_at_ratio(len(context_ids), ratio, model.config.num_key_value_heads)
        assert set(result["evicted_per_layer"]) == {evicted}


@pytest.mark.parametrize("ratio,sinks", [(0.3, 4), (0.8, 4), (0.5, 0)])
def test_streaming_llm_at_a_fixed_ratio_keeps_what_kvpress_streaming_llm_press_keeps(demo, ratio, sinks):
    """At a compression ratio StreamingLLM's order is recency: its sinks and the most recent
    positions the budget leaves are kept, whatever window its streaming entry sweeps, as kvpress's
    `StreamingLLMPress` keeps them: the same tokens, the same count per layer, and a batch gives what
    each document gives alone."""
    from kvpress import StreamingLLMPress

    model = demo[0]
    press = ratio_press(model, "streaming_llm", {"sinks": sinks}, ratio)
    assert press.sliding_window_size == 0
    upstream = lambda: StreamingLLMPress(compression_ratio=ratio, n_sink=sinks)  # noqa: E731
    eos = {model.generation_config.eos_token_id}
    for context_ids, question_ids, result, text, answer, _ in beside_kvpress_pipeline(demo, press, upstream):
        assert text == answer
        evicted = evicted_at_ratio(len(context_ids), ratio, model.config.num_key_value_heads)
        assert result["evicted_per_layer"] == [evicted] * model.config.num_hidden_layers and evicted > 0
        alone = compress_once_generate(model, [context_ids], [question_ids], NEW_TOKENS, press, eos_token_ids=eos)
        assert alone[0] == result


def test_streaming_llm_at_a_fixed_ratio_evicts_the_oldest_after_the_sinks(demo):
    """The positions evicted are [sinks, sinks + n_pruned), those kvpress's `StreamingLLMPress`
    scores 0: the continuation's loss equals the model's own forward over a cache with exactly those
    masked (kvpress's masked-key attention)."""
    model, _, pipe = demo
    context, _ = pipeline_ids(pipe, contexts_of([80])[0], QUESTION)
    continuation = context[-10:]
    context = context[:-10]
    n, ratio, sinks = len(context), 0.6, 4
    n_pruned = n - max(1, int(n * (1 - ratio)))
    result = compress_once_nll(
        model, [context], [continuation], ratio_press(model, "streaming_llm", {"sinks": sinks}, ratio)
    )[0]
    heads = model.config.num_key_value_heads
    pruned = torch.arange(sinks, sinks + n_pruned).repeat(heads)
    masked = (torch.zeros_like(pruned), torch.arange(heads).repeat_interleave(n_pruned), pruned)
    cache = DynamicCache()
    with torch.no_grad():
        first = model(torch.tensor([context]), past_key_values=cache).logits[0, -1:]
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = masked
        try:
            logits = model(torch.tensor([continuation[:-1]]), past_key_values=cache).logits[0]
        finally:
            for layer in model.model.layers:
                layer.self_attn.masked_key_indices = None
    target = torch.tensor(continuation)
    reference = torch.nn.functional.cross_entropy(torch.cat([first, logits]), target, reduction="sum")
    assert result["nll_sum"] == pytest.approx(float(reference), rel=1e-5)
    assert result["evicted_per_layer"] == [n_pruned * heads] * model.config.num_hidden_layers


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_expected_attention_at_a_fixed_ratio_keeps_what_kvpress_expected_attention_press_keeps(demo, ratio):
    """In kvpress's protocol the statistics of the queries are those of the context's one pass
    (its first `sinks` left out), as kvpress's `ExpectedAttentionPress` takes them: with no window,
    the same tokens and the same count evicted per layer."""
    from kvpress import ExpectedAttentionPress

    model = demo[0]
    press = ratio_press(model, "expected_attention", {"sliding_window": 0, "sinks": 4}, ratio)
    upstream = lambda: ExpectedAttentionPress(compression_ratio=ratio, n_sink=4)  # noqa: E731
    for context_ids, _, result, text, answer, _ in beside_kvpress_pipeline(demo, press, upstream):
        assert text == answer
        evicted = evicted_at_ratio(len(context_ids), ratio, model.config.num_key_value_heads)
        assert result["evicted_per_layer"] == [evicted] * model.config.num_hidden_layers and evicted > 0


@pytest.mark.parametrize("threshold,window", [(0.02, 8), (0.1, 16)])
def test_expected_attention_at_a_threshold_is_kvpress_dms_press_around_it(demo, threshold, window):
    """`DMSPress(ExpectedAttentionPress)` evicts the context's positions whose score is below the
    threshold: the same tokens and the same entries masked per layer. With `decoding=True` kvpress
    fails at the first decoding step (kvpress 0.5.5: `ExpectedAttentionPress.score` asserts that the
    pass holds more than `n_sink` keys, and a decoding pass holds one); kvsweep's keeps deciding,
    with the statistics of every query so far."""
    from kvpress import ExpectedAttentionPress

    from kvsweep.engine.methods import expected_attention

    model, _, pipe = demo
    press = expected_attention(threshold, window, 4, 512, True, True)
    press.post_init_from_model(model)
    upstream = lambda: DMSPress(ExpectedAttentionPress(n_sink=4), threshold=threshold, sliding_window_size=window)  # noqa: E731
    results = []
    for context_ids, question_ids, result, text, answer, masked in beside_kvpress_pipeline(demo, press, upstream):
        assert text == answer
        assert result["evicted_per_layer"] == masked and sum(masked) > 0
        results.append((context_ids, question_ids, result))
    context_ids, question_ids, prefill_only = results[0]
    decoding = compress_once_generate(model, [context_ids], [question_ids], NEW_TOKENS, press, decoding=True)[0]
    assert sum(decoding["evicted_per_layer"]) > sum(prefill_only["evicted_per_layer"])
    upstream_decoding = DMSPress(
        ExpectedAttentionPress(n_sink=4), threshold=threshold, sliding_window_size=window, decoding=True
    )
    with pytest.raises(AssertionError, match="more tokens than n_sink=4"):
        pipe(contexts_of([60])[0], question=QUESTION, press=upstream_decoding, max_new_tokens=NEW_TOKENS)
    kvpress_evicted_per_layer(model)


# (ratio, layerwise, KVzip+, repeat chunk): one budget over the layers, or per layer; contexts
# replayed whole, or in chunks of 32 and 40 tokens (kvpress's prompt to go on from the last ones).
KVZIP = [(0.5, False, True, 2048), (0.7, True, False, 40), (0.3, False, True, 32)]


@pytest.mark.parametrize("ratio,layerwise,plus,chunk", KVZIP)
def test_kvzip_keeps_what_kvpress_kvzip_press_keeps(demo, ratio, layerwise, plus, chunk):
    """kvzip is kvpress's `KVzipPress` run on each context alone, its masked entries masked in
    kvsweep's cache: the same tokens as kvpress's pipeline and the same entries masked per layer
    (which differ from layer to layer unless `layerwise`), and a batch gives what each document
    gives alone."""
    from kvpress import KVzipPress

    model = demo[0]
    given = {"layerwise": layerwise, "kvzip_plus": plus, "repeat_chunk": chunk}
    press = ratio_press(model, "kvzip", given, ratio)
    upstream = lambda: KVzipPress(  # noqa: E731
        compression_ratio=ratio, layerwise=layerwise, kvzip_plus_normalization=plus, chunk_size=chunk
    )
    eos = {model.generation_config.eos_token_id}
    layers_differ = False
    for context_ids, question_ids, result, text, answer, masked in beside_kvpress_pipeline(demo, press, upstream):
        assert text == answer
        assert result["evicted_per_layer"] == masked
        # kvpress's budget: the ratio of every layer's entries, or of all of them at once.
        entries = len(context_ids) * model.config.num_key_value_heads
        assert sum(masked) == (int(entries * ratio) * len(masked) if layerwise else int(entries * len(masked) * ratio))
        layers_differ |= len(set(masked)) > 1
        alone = compress_once_generate(model, [context_ids], [question_ids], NEW_TOKENS, press, eos_token_ids=eos)
        assert alone[0] == result
    assert layers_differ != layerwise


def test_kvzip_continuations_loss_is_kvpress_kvzip_masked_cache(demo):
    """`perplexity_kvpress` with kvzip: the reference is kvpress's `KVzipPress` around the context's
    pass, then the model's plain forward over the continuation, one token at a time, with the
    entries KVzipPress masked."""
    from kvpress import KVzipPress

    model, tokenizer, _ = demo
    texts = contexts_of([70, 110])
    contexts = [tokenizer.encode(t)[:-10] for t in texts]
    continuations = [tokenizer.encode(t)[-10:] for t in texts]
    ours = compress_once_nll(model, contexts, continuations, ratio_press(model, "kvzip", {}, 0.5))
    for context, continuation, result in zip(contexts, continuations, ours, strict=True):
        cache = DynamicCache()
        with torch.inference_mode():
            with KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=True)(model):
                logits = [model(input_ids=torch.tensor([context]), past_key_values=cache).logits[0, -1]]
            for k, token in enumerate(continuation[:-1]):
                position = torch.tensor([[len(context) + k]])
                logits.append(
                    model(torch.tensor([[token]]), past_key_values=cache, position_ids=position).logits[0, -1]
                )
        reference = torch.nn.functional.cross_entropy(torch.stack(logits), torch.tensor(continuation), reduction="sum")
        masked = kvpress_evicted_per_layer(model)
        assert result["evicted_per_layer"] == masked and sum(masked) > 0
        assert result["nll_sum"] == pytest.approx(float(reference), rel=1e-5)


def test_kvzip_loads_the_tokenizer_once_for_a_batch(demo, monkeypatch):
    """KVzipPress loads the model's tokenizer on each call; a kvzip press loads it once, and leaves
    kvpress's module as it found it."""
    import kvpress.presses.kvzip_press as kvzip_module
    from transformers import AutoTokenizer as loader

    model, _, pipe = demo
    loads = []
    load = loader.from_pretrained
    monkeypatch.setattr(loader, "from_pretrained", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs))
    ids = [pipeline_ids(pipe, context, QUESTION) for context in contexts_of([40, 60, 80])]
    press = ratio_press(model, "kvzip", {}, 0.5)
    results = compress_once_generate(model, [c for c, _ in ids], [q for _, q in ids], 2, press)
    assert len(loads) == 1 and all(sum(r["evicted_per_layer"]) > 0 for r in results)
    assert kvzip_module.AutoTokenizer is loader


def test_kvzip_with_a_chat_template_keeps_what_kvpress_keeps_and_refuses_a_context_without_it(demo, tmp_path):
    """KVzipPress takes every context to start with the chat template's prefix, which it never
    replays (kvpress's pipeline builds contexts so): with a tokenizer that has a template, kvzip
    gives the pipeline's tokens and counts on the pipeline's contexts, and refuses a context that
    lacks the prefix (a bare report) rather than evicting the prefix's positions first."""
    import shutil

    from kvpress import KVzipPress

    from kvsweep.core.errors import KvsweepError

    folder = tmp_path / "templated"
    shutil.copytree(BUNDLED_MODEL, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    templated = (model, tokenizer, pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu"))
    press = ratio_press(model, "kvzip", {}, 0.4)
    upstream = lambda: KVzipPress(compression_ratio=0.4, kvzip_plus_normalization=True)  # noqa: E731
    for _, _, result, text, answer, masked in beside_kvpress_pipeline(templated, press, upstream):
        assert text == answer and result["evicted_per_layer"] == masked and sum(masked) > 0
    bare = tokenizer.encode(contexts_of([60])[0])
    with pytest.raises(KvsweepError, match="does not start with the chat template's prefix"):
        compress_once_nll(model, [bare[:-5]], [bare[-5:]], press)


def test_kvzip_decides_at_a_compression_ratio_only_and_from_its_own_passes(demo):
    from kvsweep.core.errors import KvsweepError
    from kvsweep.engine.methods import build_press
    from kvsweep.study.methods import get_method

    model, _, pipe = demo
    method = get_method("kvzip")
    with pytest.raises(ValueError, match="compression ratio only"):
        build_press(method, 0.1, method.resolve(0.0, {}))
    with pytest.raises(ValueError, match="its own, not AdaKV's"):
        build_press(method, None, method.resolve(0.0, {}), compression_ratio=0.5, adaptive_safeguard=0.2)
    press = ratio_press(model, "kvzip", {}, 0.5)
    context, question = pipeline_ids(pipe, contexts_of([40])[0], QUESTION)
    with pytest.raises(KvsweepError, match="kvpress's KVzipPress does not run on Linear"):
        press.press.prepare_contexts(torch.nn.Linear(2, 2), [context], 0.5)
    compress_once_generate(model, [context], [question], NEW_TOKENS, press)
    # A batch whose passes nothing ran does not reuse the last batch's choice.
    press.prepare_contexts = lambda model, contexts: None
    with pytest.raises(ValueError, match="prepare_contexts first"):
        compress_once_generate(model, [context], [question], NEW_TOKENS, press)


@pytest.mark.parametrize("name,ratio,safeguard", [("knorm", 0.5, 0.2), ("knorm", 0.75, 0.0), ("kvzap", 0.6, 0.5)])
def test_an_adaptive_ratio_keeps_what_kvpress_adakv_press_keeps(demo, surrogate, name, ratio, safeguard):
    """AdaKV's budget (kvpress `AdaKVPress` around a scorer): a layer's heads share n_kept per head,
    each keeping at least its safeguard's share; the same tokens as kvpress's pipeline and the same
    entries evicted per layer (kvpress's masked indices), which now differ from head to head."""
    from kvpress import AdaKVPress

    from kvsweep.engine.methods import build_press
    from kvsweep.study.methods import get_method

    model = demo[0]
    given = {"sliding_window": 0, "sinks": 0, **({"kvzap_surrogate": surrogate} if name == "kvzap" else {})}
    press = ratio_press(model, name, given, ratio, safeguard)
    upstream = lambda: AdaKVPress(kvpress_scorer(name, ratio, surrogate, model), alpha_safeguard=safeguard)  # noqa: E731
    for _, _, result, text, answer, masked in beside_kvpress_pipeline(demo, press, upstream):
        assert text == answer
        assert result["evicted_per_layer"] == masked
    method = get_method(name)
    with pytest.raises(ValueError, match="shares a compression ratio's budget"):
        build_press(method, 0.0, method.resolve(0.0, given), adaptive_safeguard=safeguard)


def test_lowest_scored_with_a_safeguard_is_the_slow_selection():
    """AdaKV by hand: each head's safeguard kept, then the lowest over all heads evicted until each
    document has evicted heads x (n - n_kept) of its positions deciding."""
    from kvsweep.engine.press import lowest_scored

    generator = torch.Generator().manual_seed(1)
    scores = torch.randperm(3 * 4 * 30, generator=generator).float().view(3, 4, 30)
    position = torch.arange(30).repeat(3, 1)
    position[2, 20:] = -1
    tokens = torch.tensor([30, 30, 20])
    deciding = position >= 0
    for ratio, safeguard in ((0.5, 0.2), (0.8, 0.5), (0.3, 0.0), (0.9, 1.0)):
        chosen = lowest_scored(scores, deciding, position, tokens, ratio, safeguard)
        for b in range(3):
            n = int(tokens[b])
            n_kept = max(1, int(n * (1 - ratio)))
            n_safe = max(1, int(n_kept * safeguard)) if safeguard > 0 else 0
            safe = {(h, j) for h in range(4) for j in sorted(range(n), key=lambda j: -float(scores[b, h, j]))[:n_safe]}
            others = sorted(((h, j) for h in range(4) for j in range(n) if (h, j) not in safe),
                            key=lambda hj: float(scores[b, hj[0], hj[1]]))  # fmt: skip
            expected = set(others[: 4 * (n - n_kept)])
            found = {(h, j) for h, j in torch.nonzero(chosen[b]).tolist()}
            assert found == expected


def test_a_fixed_ratio_is_refused_while_streaming(model):
    """kvpress's budget is over a whole context, decided once: a stream never holds one."""
    from kvsweep.engine.generate import stream_generate

    press = knorm(-3.0, 0, 0)
    press.fixed_ratio = 0.5
    documents = random_documents([20, 30])
    with pytest.raises(ValueError, match="use compress_once"):
        stream_nll(model, documents, chunk_size=4, press=press)
    with pytest.raises(ValueError, match="use compress_once"):
        stream_generate(model, documents, max_new_tokens=2, chunk_size=4, press=press)
