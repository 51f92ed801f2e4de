"""The kvpress-protocol tasks through kvsweep's own commands: `prepare` records each document's
context and question as kvpress's pipeline tokenizes them, and an `evaluate` job's answers and
evictions are what kvpress's pipeline gives on the recorded strings (the check anyone can rerun
on a study's shards)."""

import json

import pytest
import torch
from kvpress import DMSPress, KVzapPress
from kvpress.presses.kvzap_press import KVzapModel
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from kvsweep.demo import BUNDLED_MODEL
from kvsweep.demo.reports import generate_reports
from kvsweep.engine.compress_once import kvpress_evicted_per_layer
from kvsweep.tasks.prompts import GOV_REPORT_QUESTION

from conftest import kvsweep, tiny_surrogate

MODEL = str(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Summarization shards of 6 demo reports, two of them longer than max_length 200."""
    folder = tmp_path_factory.mktemp("kvpress_protocol")
    reports = [r for r in generate_reports(12, seed=7) if len(r["report"].split()) > 60][:6]
    (folder / "reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))
    kvsweep("prepare", "--source", folder / "reports.jsonl", "--tokenizer", MODEL, "--id-field", "id",
            "--summary-field", "summary", "--max-documents", "6", "--max-length", "200", "--min-length", "16",
            "--shard-size", "6", "--tasks", "summarization_kvpress", "perplexity_kvpress",
            "--output-dir", folder / "data")  # fmt: skip
    return folder


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_records_context_and_question_as_kvpress_tokenizes_them(shard):
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(MODEL))
    docs = lines(shard / "data" / "summarization_kvpress" / "shard000.jsonl")
    assert len(docs) == 6 and any(len(d["input_ids"]) >= 190 for d in docs)
    for doc in docs:
        tensors = pipe.preprocess(
            doc["context"], questions=[doc["question"]], answer_prefix="", max_context_length=10**9
        )
        context_ids, question_ids = tensors["context_ids"][0].tolist(), tensors["questions_ids"][0][0].tolist()
        assert doc["input_ids"] == context_ids + question_ids and doc["context_length"] == len(context_ids)
        assert len(doc["input_ids"]) <= 200 and doc["question"] == GOV_REPORT_QUESTION
        assert doc["context"].startswith("You are given a report by a government agency.")
    # Some reports fit whole and some were cut in the middle (LongBench's rule) to fit max_length.
    reports = {r["id"]: r["report"] for r in lines(shard / "reports.jsonl")}
    whole = [reports[doc["id"]] in doc["context"] for doc in docs]
    assert any(whole) and not all(whole)


@pytest.mark.parametrize("decoding", [False, True], ids=["prefill_only", "decoding"])
def test_an_evaluate_job_answers_as_kvpress_pipeline_on_the_recorded_strings(shard, tmp_path, decoding):
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    surrogate = tmp_path / "surrogate"
    tiny_surrogate(model, seed=3).save_pretrained(surrogate)
    data = shard / "data" / "summarization_kvpress" / "shard000.jsonl"
    out = tmp_path / "out.jsonl"
    kvsweep("evaluate", "--model", MODEL, "--data", data, "--max-length", "200", "--chunk-size", "16", "--task", "summarization_kvpress",
            "--max-new-tokens", "16", "--decoding", str(decoding).lower(), "--method", "kvzap_no_sink",
            "--threshold", "0", "--sliding-window", "8", "--kvzap-surrogate", surrogate, "--batch-size", "3",
            "--output", out)  # fmt: skip
    results = {r["id"]: r for r in lines(out)}
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(MODEL))
    for doc in lines(data):
        scorer = KVzapPress(model_type="mlp")
        scorer.kvzap_model = KVzapModel.from_pretrained(surrogate)
        scorer.kvzap_model_name = f"nvidia/KVzap-mlp-{model.config.name_or_path.split('/')[-1]}"
        press = DMSPress(scorer, threshold=0.0, sliding_window_size=8, decoding=decoding)
        answer = pipe(doc["context"], question=doc["question"], press=press, max_new_tokens=16)["answer"]
        masked = kvpress_evicted_per_layer(model)
        result = results[doc["id"]]
        assert result["generated"] == answer.strip()
        assert result["evicted_per_layer"] == masked and sum(masked) > 0
        assert result["n_prompt_tokens"] == len(doc["input_ids"])
        assert result["provenance"]["protocol"] == "kvpress"


def test_a_context_length_that_splits_nothing_is_refused(shard, tmp_path, capsys):
    doc = lines(shard / "data" / "summarization_kvpress" / "shard000.jsonl")[0]
    bad = tmp_path / "shard000.jsonl"
    bad.write_text(json.dumps({**doc, "context_length": len(doc["input_ids"])}) + "\n")
    with pytest.raises(SystemExit):
        kvsweep("evaluate", "--model", MODEL, "--data", bad, "--max-length", "200", "--chunk-size", "16", "--task",
                "summarization_kvpress", "--method", "baseline", "--output", tmp_path / "o.jsonl")  # fmt: skip
    err = capsys.readouterr().err
    assert f"context_length must be a whole number from 1 to {len(doc['input_ids']) - 1}" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()


def test_perplexity_in_kvpress_protocol_scores_the_continuation_and_refuses_short_documents(shard, tmp_path, capsys):
    data = shard / "data" / "perplexity_kvpress" / "shard000.jsonl"
    docs = lines(data)
    common = ["--model", MODEL, "--data", data, "--max-length", "200", "--chunk-size", "16", "--task", "perplexity_kvpress",
              "--method", "baseline"]  # fmt: skip
    kvsweep("evaluate", *common, "--continuation-tokens", "20", "--output", tmp_path / "out.jsonl")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    for doc, result in zip(docs, lines(tmp_path / "out.jsonl"), strict=True):
        ids = doc["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, len(ids) - 21 : -1]
        reference = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[-20:]), reduction="sum")
        assert result["n_predicted"] == 20 and result["nll_sum"] == pytest.approx(float(reference), rel=1e-5)
    shortest = min(len(d["input_ids"]) for d in docs)
    with pytest.raises(SystemExit):
        kvsweep("evaluate", *common, "--continuation-tokens", str(shortest), "--output", tmp_path / "short.jsonl")
    err = capsys.readouterr().err
    assert f"tokens: perplexity_kvpress scores its last {shortest}" in err and "Traceback" not in err
    assert not (tmp_path / "short.jsonl").exists()


def test_a_tokenizer_kvpress_cannot_use_is_one_message():
    from kvsweep.core.errors import KvsweepError
    from kvsweep.tasks.prompts import kvpress_ids

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    tokenizer.bos_token = None  # and no chat template: kvpress's preprocess would add None to the text
    with pytest.raises(KvsweepError, match="neither a chat template nor a BOS token"):
        kvpress_ids(tokenizer, "a report", GOV_REPORT_QUESTION)


def kvpress_ratio_press(method: str, ratio: float, safeguard: float | None):
    """kvpress's press for the `evaluate` job of `method` at `ratio` in the test below."""
    from kvpress import AdaKVPress, KnormPress, KVzipPress, StreamingLLMPress

    if method == "streaming_llm":
        return StreamingLLMPress(ratio, n_sink=4)
    if method == "kvzip":  # kvsweep's kvzip is KVzip+ unless told otherwise
        return KVzipPress(ratio, kvzip_plus_normalization=True)
    return KnormPress(ratio) if safeguard is None else AdaKVPress(KnormPress(ratio), alpha_safeguard=safeguard)


@pytest.mark.parametrize(
    ("method", "flags", "safeguard"),
    [("knorm", ["--sliding-window", "0", "--sinks", "0"], None), ("knorm", ["--sliding-window", "0", "--sinks", "0"], 0.3),
     ("streaming_llm", ["--sinks", "4", "--sliding-window", "0"], None), ("kvzip", [], None)],
    ids=["per_head", "adakv", "streaming_llm", "kvzip"],
)  # fmt: skip
def test_a_compression_ratio_job_answers_as_kvpress_press_on_the_recorded_strings(
    shard, tmp_path, method, flags, safeguard
):
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    data = shard / "data" / "summarization_kvpress" / "shard000.jsonl"
    out = tmp_path / "out.jsonl"
    # (no --chunk-size: kvpress's protocol reads each context in one pass)
    kvsweep("evaluate", "--model", MODEL, "--data", data, "--max-length", "200", "--task",
            "summarization_kvpress", "--max-new-tokens", "16", "--method", method, "--compression-ratio", "0.6",
            *flags, "--batch-size", "3", "--output", out,
            *(["--adaptive-safeguard", str(safeguard)] if safeguard is not None else []))  # fmt: skip
    results = {r["id"]: r for r in lines(out)}
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(MODEL))
    for doc in lines(data):
        press = kvpress_ratio_press(method, 0.6, safeguard)
        answer = pipe(doc["context"], question=doc["question"], press=press, max_new_tokens=16)["answer"]
        n = doc["context_length"]
        assert results[doc["id"]]["generated"] == answer.strip()
        # kvpress's ScorerPress removes what it evicts; KVzipPress masks it, and says where
        masked = kvpress_evicted_per_layer(model)
        per_head = (n - int(n * 0.4)) * model.config.num_key_value_heads
        evicted = masked if method == "kvzip" else [per_head] * model.config.num_hidden_layers
        assert results[doc["id"]]["evicted_per_layer"] == evicted and sum(evicted) > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--task", "summarization_kvpress", "--method", "knorm", "--threshold", "-3"], "two budgets for one job"),
        (["--task", "summarization_kvpress", "--method", "streaming_llm", "--sliding-window", "64"],
         "--sliding-window: at a compression ratio, method 'streaming_llm' keeps its sinks and the most recent"),
        (["--task", "summarization_kvpress", "--method", "streaming_llm", "--adaptive-safeguard", "0.2"],
         "method 'streaming_llm' shares its budget at a ratio its own way"),
        (["--task", "summarization_kvpress", "--method", "kvzip", "--adaptive-safeguard", "0.2"],
         "method 'kvzip' shares its budget at a ratio its own way"),
        (["--task", "perplexity", "--method", "kvzip"], "task perplexity streams"),
        (["--task", "summarization_kvpress", "--method", "baseline"], "'baseline' has no score"),
        (["--task", "summarization", "--method", "knorm"], "task summarization streams"),
        (["--task", "summarization_kvpress", "--method", "knorm", "--decoding", "true"], "--decoding must be false"),
        (["--task", "summarization_kvpress", "--method", "knorm", "--threshold", "-3", "--adaptive-safeguard", "0.2"],
         "--adaptive-safeguard shares a compression ratio's budget (AdaKV): give --compression-ratio"),
    ],
)  # fmt: skip
def test_a_compression_ratio_where_it_means_nothing_is_one_message(shard, tmp_path, capsys, flags, message):
    data = shard / "data" / flags[1] / "shard000.jsonl"
    ratio = [] if "give --compression-ratio" in message else ["--compression-ratio", "0.5"]
    with pytest.raises(SystemExit):
        kvsweep("evaluate", "--model", MODEL, "--data", data, "--max-length", "200", "--chunk-size", "16",
                *ratio, *flags, "--output", tmp_path / "o.jsonl")  # fmt: skip
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "o.jsonl").exists()


def test_a_streaming_task_without_a_chunk_size_is_one_message(shard, tmp_path, capsys):
    data = shard / "data" / "summarization_kvpress" / "shard000.jsonl"
    with pytest.raises(SystemExit):
        kvsweep("evaluate", "--model", MODEL, "--data", data, "--max-length", "200", "--task", "perplexity",
                "--method", "baseline", "--output", tmp_path / "o.jsonl")  # fmt: skip
    err = capsys.readouterr().err
    assert "--chunk-size is needed: task perplexity streams its input in chunks" in err and "Traceback" not in err


def test_a_job_records_each_documents_share_of_the_compacted_cache_and_its_decoding_speed(shard, tmp_path):
    """kvpress's protocol compacts the cache after the context's decision: at ratio 0.75 a batch's
    cache holds the widest document's kept quarter of its context (per KV head), the questions and
    the answers' slots, where the baseline's holds the longest context whole."""
    from kvsweep.stages.evaluate import planned_batches

    data = shard / "data" / "summarization_kvpress" / "shard000.jsonl"
    common = ["--model", MODEL, "--data", data, "--max-length", "200", "--task", "summarization_kvpress",
              "--max-new-tokens", "8", "--batch-size", "3"]  # fmt: skip
    kvsweep("evaluate", *common, "--method", "baseline", "--output", tmp_path / "baseline.jsonl")
    kvsweep("evaluate", *common, "--method", "knorm", "--compression-ratio", "0.75", "--sliding-window", "0",
            "--sinks", "0", "--output", tmp_path / "knorm.jsonl")  # fmt: skip
    config = AutoModelForCausalLM.from_pretrained(MODEL).config
    per_slot = 2 * 4 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers  # float32 K and V
    baseline, knorm = ({r["id"]: r for r in lines(tmp_path / f"{name}.jsonl")} for name in ("baseline", "knorm"))
    for batch in planned_batches(lines(data), 3):
        contexts = [d["context_length"] for d in batch]
        tail = max(len(d["input_ids"]) - d["context_length"] for d in batch) + 8  # questions, answers
        for doc in batch:
            assert baseline[doc["id"]]["kv_cache_bytes"] == (max(contexts) + tail) * per_slot
            assert knorm[doc["id"]]["kv_cache_bytes"] == (max(int(n * 0.25) for n in contexts) + tail) * per_slot
            assert baseline[doc["id"]]["decode_tok_s"] > 0 and knorm[doc["id"]]["decode_tok_s"] > 0


def test_contexts_prefilled_one_at_a_time_give_what_the_whole_batch_gives(shard, tmp_path):
    """--prefill-batch-size 1: each context's pass alone, compacted before the next; the answers
    still decode together, the same as with the batch prefilled at once (speed and memory only)."""
    data = shard / "data" / "summarization_kvpress" / "shard000.jsonl"
    common = ["--model", MODEL, "--data", data, "--max-length", "200", "--task", "summarization_kvpress",
              "--max-new-tokens", "8", "--batch-size", "3", "--method", "knorm", "--compression-ratio", "0.6",
              "--sliding-window", "0", "--sinks", "0"]  # fmt: skip
    kvsweep("evaluate", *common, "--output", tmp_path / "batch.jsonl")
    kvsweep("evaluate", *common, "--prefill-batch-size", "1", "--output", tmp_path / "one.jsonl")
    timing = ("provenance", "decode_tok_s")
    together, alone = ([{k: v for k, v in r.items() if k not in timing} for r in lines(tmp_path / f"{name}.jsonl")]
                       for name in ("batch", "one"))  # fmt: skip
    assert together == alone and any(r["kv_kept"] < r["kv_total"] for r in alone)
