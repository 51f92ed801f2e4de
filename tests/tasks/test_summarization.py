"""Summarization: ROUGE, generation under eviction (against an independent greedy loop), batching,
LongBench's prompt truncation, scoring and the command line."""

import json
import math

import pandas as pd
import pytest
import torch
from rouge import Rouge
from rouge_score import rouge_scorer

from kvsweep.analysis.results import load_results
from kvsweep.analysis.rouge import longbench_rouge_l, rouge_score_f1
from kvsweep.demo.model import build_tokenizer
from kvsweep.engine.generate import stream_generate
from kvsweep.engine.methods import build_press
from kvsweep.study.methods import get_method
from kvsweep.tasks import work_of
from kvsweep.tasks.prompts import summarization_prompt_ids

from conftest import every_pass_through_split_kernels, kvsweep, random_documents

PAIRS = [
    ("the cat sat on the mat", "the cat was on the mat"),
    ("GAO found that the agency lacked reliable data on costs .",
     "GAO reviewed the agency program and found that it lacked reliable data ."),
    ("officials agreed with the recommendations", "the department did not agree with two recommendations"),
]  # fmt: skip


def test_rouge_of_a_text_with_itself_is_100():
    text = "GAO recommends that the Department of Energy develop a plan for the pilot program ."
    assert longbench_rouge_l(text, [text]) == pytest.approx(100, abs=1e-5)
    assert rouge_score_f1(text, [text]) == pytest.approx({"rouge1": 100, "rouge2": 100, "rougeLsum": 100})


@pytest.mark.parametrize("prediction,reference", PAIRS)
def test_rouge_equals_the_packages_own_numbers(prediction, reference):
    expected_l = Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    assert longbench_rouge_l(prediction, [reference]) == pytest.approx(100 * expected_l)
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True).score(reference, prediction)
    assert rouge_score_f1(prediction, [reference]) == pytest.approx({k: 100 * v.fmeasure for k, v in scores.items()})


def test_rouge_by_hand_max_over_references_and_empty_prediction():
    # rouge-score's ROUGE-1 by hand: 5 of 6 unigrams shared both ways -> F1 5/6.
    assert rouge_score_f1("the cat sat on the mat", ["the cat was on the mat"])["rouge1"] == pytest.approx(500 / 6)
    refs = ["completely different words here", "the cat sat on the mat"]
    assert longbench_rouge_l("the cat sat on the mat", refs) == pytest.approx(100, abs=1e-5)
    assert longbench_rouge_l("", refs) == 0.0  # LongBench scores an empty answer 0


def greedy_reference(model, prompt, max_new_tokens):
    """Independent greedy decoding: the whole sequence recomputed at every step, no cache, no chunks."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def press_for(method, threshold, surrogate_dir, window=4):
    spec = get_method(method)
    given = {"local_window": window} if "local_window" in spec.defaults else {"sliding_window": window}
    if "kvzap_surrogate" in spec.defaults:
        given["kvzap_surrogate"] = surrogate_dir
    return build_press(spec, threshold, spec.resolve(threshold, given))


@pytest.mark.parametrize("chunk,key_bucket", [(1, None), (7, None), (1, 1), (7, 14)])
def test_baseline_generation_equals_plain_greedy_decoding(model, chunk, key_bucket):
    for prompt in random_documents([30, 17], seed=5):
        result = stream_generate(model, [prompt], chunk, 10, key_bucket=key_bucket)[0]
        assert result["generated_ids"] == greedy_reference(model, prompt, 10)
        assert result["kv_kept"] == result["kv_total"] == 2 * 2 * (len(prompt) + 10 - 1)


@pytest.mark.parametrize("method", ["kvzap", "kvzap_no_sink", "h2o", "random", "expected_attention", "knorm"])
def test_threshold_minus_inf_generates_the_baseline_tokens(model, surrogate_dir, method):
    prompts = random_documents([33, 20, 26], seed=6)
    baseline = stream_generate(model, prompts, 8, 12)
    result = stream_generate(model, prompts, 8, 12, press_for(method, -math.inf, surrogate_dir))
    assert [r["generated_ids"] for r in result] == [b["generated_ids"] for b in baseline]


# Random eviction names a document by its prompt and positions its generated tokens as alone;
# Expected Attention's statistics and RoPE average follow each document's own length.
@pytest.mark.parametrize(
    "method,threshold",
    [("kvzap", 0.0), ("h2o", 0.06), ("random", 0.5), ("expected_attention", 0.1), ("knorm", -3.0), (None, None)],
)
def test_batch_of_three_generates_what_batch_one_does(model, surrogate_dir, method, threshold):
    prompts = random_documents([41, 19, 30], seed=7)

    def press():
        return press_for(method, threshold, surrogate_dir) if method else None

    alone = [stream_generate(model, [p], 8, 16, press())[0] for p in prompts]
    together = stream_generate(model, prompts, 8, 16, press())
    assert together == alone
    # Key buckets of 8 slots: prompt and decoding passes attend to short key ranges, and eviction
    # decisions are bounded by the bucket; nothing may change.
    assert stream_generate(model, prompts, 8, 16, press(), key_bucket=8) == alone
    if method:
        assert all(r["kv_kept"] < r["kv_total"] for r in together), "eviction should happen"


@pytest.mark.slow  # the Triton interpreter: tens of seconds (make check skips it)
@pytest.mark.parametrize("method,threshold", [("kvzap", 0.0), ("h2o", 0.06)])
def test_generation_through_split_kernels_generates_what_the_torch_path_does(
    model, surrogate_dir, monkeypatch, method, threshold
):
    """As on a GPU: every pass, prompt chunks and decoding steps, attends through the Triton
    kernels, with keys split in shares of 16, over generation's layout (prompts of different
    lengths, so padding slots between a prompt and its new tokens). The tokens and the kept
    counts are those of the torch path, alone and in a batch."""
    prompts = random_documents([41, 19, 30], seed=7)
    torch_path = [stream_generate(model, [p], 8, 16, press_for(method, threshold, surrogate_dir))[0] for p in prompts]
    splits = every_pass_through_split_kernels(monkeypatch)
    # Key buckets of one chunk: the passes' python bounds are tight (the column sums start there).
    kernels = stream_generate(model, prompts, 8, 16, press_for(method, threshold, surrogate_dir), key_bucket=8)
    assert max(splits) > 1, "no pass was split: the case does not test the combination"
    assert [r["generated_ids"] for r in kernels] == [r["generated_ids"] for r in torch_path]
    assert [r["kv_kept"] for r in kernels] == [r["kv_kept"] for r in torch_path]
    assert all(r["kv_kept"] < r["kv_total"] for r in kernels), "eviction should happen"


def test_eviction_continues_while_decoding(model, surrogate_dir):
    """With a window of 4 and a threshold that evicts everything, the cache stays at the window."""
    prompt = random_documents([20], seed=8)[0]
    result = stream_generate(model, [prompt], 4, 30, press_for("kvzap_no_sink", 1e30, surrogate_dir))[0]
    assert result["kv_total"] == 2 * 2 * (20 + 30 - 1)
    assert result["kv_kept"] == 2 * 2 * 4


def test_end_of_sequence_stops_one_document_only(model):
    prompts = random_documents([25, 31], seed=9)
    free = stream_generate(model, prompts, 8, 12)
    stop = free[0]["generated_ids"][3]
    first_stop = free[0]["generated_ids"].index(stop)
    stopped = stream_generate(model, prompts, 8, 12, eos_token_ids={stop})
    assert stopped[0]["generated_ids"] == free[0]["generated_ids"][:first_stop]
    assert stopped[0]["n_generated"] == first_stop
    alone = stream_generate(model, [prompts[1]], 8, 12, eos_token_ids={stop})[0]
    assert stopped[1] == alone


WORDS = "GAO reviewed the agency program and found that it lacked reliable data on costs officials agreed".split()


@pytest.fixture(scope="module")
def word_tokenizer():
    from kvsweep.tasks.prompts import GOV_REPORT_PROMPT

    return build_tokenizer([GOV_REPORT_PROMPT, " ".join(WORDS)])


def test_long_prompt_is_truncated_in_the_middle_of_the_report(word_tokenizer, tmp_path, capsys):
    report = " ".join(WORDS * 20)
    ids, truncated = summarization_prompt_ids(word_tokenizer, report, 60)
    assert truncated and len(ids) <= 60  # BOS included: the model input fits max_length
    text = word_tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("You are given a report by a government agency.")
    assert text.endswith("Now, write a one-page summary of the report. Summary:")
    assert text.count("reviewed") < 20

    word_tokenizer.save_pretrained(tmp_path / "tok")
    source = tmp_path / "reports.jsonl"
    source.write_text(json.dumps({"report": report, "summary": "GAO found gaps"}) + "\n"
                      + json.dumps({"report": "GAO reviewed data", "summary": ["a", "b"]}) + "\n")  # fmt: skip
    kvsweep("prepare", *["--source", str(source), "--tokenizer", str(tmp_path / "tok"), "--max-documents", "2",
                  "--max-length", "60", "--shard-size", "2", "--tasks", "perplexity", "summarization",
                  "--output-dir", str(tmp_path / "data")])  # fmt: skip
    assert "1 summarization prompt(s) longer than 60 tokens were truncated in the middle" in capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "data" / "summarization" / "shard000.jsonl").read_text().splitlines()]
    assert [line["references"] for line in lines] == [["GAO found gaps"], ["a", "b"]]
    assert lines[0]["input_ids"] == ids


# A chat template in the style of Llama 3.1's: a system header with dates before the user's turn,
# the assistant's header after it (about 20 tokens in all with this word-level tokenizer).
CHAT_TEMPLATE = (
    "<|begin|> <|header|> system <|end_header|> Cutting Knowledge Date : December 2023 Today Date : 26 Jul 2024 "
    "<|eot|> {% for message in messages %}<|header|> user <|end_header|> {{ message['content'] }} <|eot|> "
    "{% endfor %}{% if add_generation_prompt %}<|header|> assistant <|end_header|>{% endif %}"
)
ASSISTANT_HEADER = "<|eot|> <|header|> assistant <|end_header|>"


@pytest.fixture(scope="module")
def chat_tokenizer():
    from kvsweep.tasks.prompts import GOV_REPORT_PROMPT

    tokenizer = build_tokenizer([GOV_REPORT_PROMPT, " ".join(WORDS), CHAT_TEMPLATE.replace("{", " ").replace("}", " ")])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("max_length", [60, 61, 75])
def test_a_chat_template_prompt_keeps_its_question_through_prepare_and_evaluate(
    model, chat_tokenizer, tmp_path, max_length
):
    """The whole model input (template included) fits max_length, so evaluate never cuts it: the
    model reads the question and the assistant's header after a long report."""
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    chat_tokenizer.save_pretrained(model_dir)
    source = tmp_path / "reports.jsonl"
    source.write_text(json.dumps({"id": "long", "report": " ".join(WORDS * 20), "summary": "GAO found gaps"}) + "\n")
    kvsweep("prepare", *["--source", str(source), "--tokenizer", str(model_dir), "--id-field", "id", "--max-documents", "1",
                  "--max-length", str(max_length), "--shard-size", "1", "--tasks", "summarization",
                  "--output-dir", str(tmp_path / "data")])  # fmt: skip
    shard = tmp_path / "data" / "summarization" / "shard000.jsonl"
    ids = json.loads(shard.read_text())["input_ids"]
    assert max_length - 2 <= len(ids) <= max_length
    text = chat_tokenizer.decode(ids)
    assert text.startswith("<|begin|> <|header|> system") and "You are given a report by a government agency." in text
    assert text.endswith("Now, write a one-page summary of the report. Summary: " + ASSISTANT_HEADER)

    out = tmp_path / "out.jsonl"
    kvsweep("evaluate", *["--model", str(model_dir), "--data", str(shard), "--chunk-size", "8", "--max-length",
                   str(max_length), "--task", "summarization", "--max-new-tokens", "4", "--method", "baseline",
                   "--output", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["n_prompt_tokens"] == len(ids)
    expected = stream_generate(model, [ids], 8, 4)[0]["generated_ids"]
    assert result["generated"] == chat_tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_a_prompt_longer_than_max_length_is_refused_not_cut(model_dir, tmp_path, capsys):
    shard = tmp_path / "shard.jsonl"
    shard.write_text(json.dumps({"id": "p", "input_ids": list(range(1, 41)), "references": ["r"]}) + "\n")
    with pytest.raises(SystemExit):
        kvsweep("evaluate", *["--model", model_dir, "--data", str(shard), "--chunk-size", "8", "--max-length", "32",
                       "--task", "summarization", "--method", "baseline", "--output", str(tmp_path / "o.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert "document 'p': the prompt has 40 tokens, more than --max-length 32" in err and "Traceback" not in err


def test_max_length_too_small_for_the_prompt_is_one_message(chat_tokenizer):
    from kvsweep.core.errors import KvsweepError

    with pytest.raises(KvsweepError, match="max_length 40 is too small for the summarization prompt"):
        summarization_prompt_ids(chat_tokenizer, " ".join(WORDS * 20), 40)


@pytest.mark.parametrize(
    "content,message",
    [
        (
            b'{"report": "GAO reviewed \\ud800 data"}\n',
            "record 0: field 'report' is not valid Unicode text (a lone surrogate '\\ud800' at character 13)",
        ),
        (b'{"report": "GAO reviewed \xff data"}\n', "line 1: not valid UTF-8 (byte 0xff at column 26)"),
        (
            b'{"report": "GAO reviewed data", "summary": "a \\udfff"}\n',
            "record 0: field 'summary' is not valid Unicode text",
        ),
    ],
    ids=["lone_surrogate", "not_utf8", "lone_surrogate_in_summary"],
)
def test_text_that_is_not_valid_unicode_is_one_message(word_tokenizer, tmp_path, capsys, content, message):
    word_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "r.jsonl").write_bytes(content)
    with pytest.raises(SystemExit):
        kvsweep("prepare", *["--source", str(tmp_path / "r.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--max-documents",
                      "1", "--max-length", "60", "--shard-size", "1", "--tasks", "summarization", "perplexity",
                      "--output-dir", str(tmp_path / "data")])  # fmt: skip
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_reference_is_a_clear_error(word_tokenizer, tmp_path, capsys):
    word_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "r.jsonl").write_text(json.dumps({"report": "GAO reviewed data on costs"}) + "\n")
    with pytest.raises(SystemExit):
        kvsweep("prepare", *["--source", str(tmp_path / "r.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--max-documents",
                      "1", "--max-length", "60", "--shard-size", "1", "--tasks", "summarization",
                      "--output-dir", str(tmp_path / "data")])  # fmt: skip
    assert "record 0: no reference summary in field 'summary'" in capsys.readouterr().err


def test_summarization_command_line_and_scores(model, surrogate_dir, word_tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    shard = tmp_path / "shard.jsonl"
    docs = [{"id": f"d{i}", "input_ids": ids, "references": ["GAO found that it lacked reliable data"]}
            for i, ids in enumerate(random_documents([30, 22, 26], seed=10))]  # fmt: skip
    shard.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = ["--model", str(model_dir), "--data", str(shard), "--chunk-size", "8", "--max-length", "64",
              "--batch-size", "2", "--task", "summarization", "--max-new-tokens", "6"]  # fmt: skip
    base_out = tmp_path / "summarization" / "baseline" / "none" / "shard000.jsonl"
    h2o_out = tmp_path / "summarization" / "h2o" / "0.06" / "shard000.jsonl"
    kvsweep("evaluate", *[*common, "--method", "baseline", "--output", str(base_out)])
    kvsweep(
        "evaluate",
        *[*common, "--method", "h2o", "--threshold", "0.06", "--local-window", "4", "--output", str(h2o_out)],
    )
    lines = [json.loads(x) for x in base_out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["d0", "d1", "d2"]
    assert set(lines[0]) == {"id", "generated", "references", "n_generated", "n_prompt_tokens", "provenance",
                             "kv_kept", "kv_total", "kv_kept_compressible", "kv_total_compressible",
                             "kv_cache_bytes", "decode_tok_s"}  # fmt: skip
    expected = stream_generate(model, [docs[0]["input_ids"]], 8, 6)[0]["generated_ids"]
    assert lines[0]["generated"] == word_tokenizer.decode(expected, skip_special_tokens=True).strip()

    table = work_of("summarization").summarize(
        load_results([str(base_out), str(h2o_out)], "summarization"), n_resamples=200
    )
    assert list(table.method) == ["baseline", "h2o"] and (table.n_docs == 3).all()
    by_hand = pd.Series([longbench_rouge_l(x["generated"], x["references"]) for x in lines]).mean()
    assert table.rougeL.iloc[0] == pytest.approx(by_hand)
    assert table.delta_rougeL.iloc[0] == 0 and table.kv_density.iloc[1] < 1


def test_prepare_reads_a_hub_style_dataset_with_a_subset(word_tokenizer, tmp_path, capsys):
    """A folder laid out like LongBench's parquet copy: a `gov_report` configuration, split `test`,
    text in `context`, references as a list in `answers`."""
    word_tokenizer.save_pretrained(tmp_path / "tok")
    repo = tmp_path / "LongBench"
    (repo / "gov_report").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: gov_report\n  data_files:\n  - split: test\n    path: gov_report/test.parquet\n---\n"
    )
    rows = [
        {"_id": f"gr{i}", "context": " ".join(WORDS[i:] * 3), "answers": [f"GAO found {WORDS[i]}"]} for i in range(3)
    ]
    pd.DataFrame(rows).to_parquet(repo / "gov_report" / "test.parquet")
    kvsweep("prepare", *["--source", str(repo), "--subset", "gov_report", "--split", "test", "--text-field", "context",
                  "--summary-field", "answers", "--id-field", "_id", "--tokenizer", str(tmp_path / "tok"),
                  "--max-documents", "3", "--max-length", "200", "--shard-size", "2",
                  "--tasks", "perplexity", "summarization", "--output-dir", str(tmp_path / "data")])  # fmt: skip
    shard = [json.loads(x) for x in (tmp_path / "data" / "summarization" / "shard000.jsonl").read_text().splitlines()]
    assert [(d["id"], d["references"]) for d in shard] == [("gr0", ["GAO found GAO"]), ("gr1", ["GAO found reviewed"])]
    second = (tmp_path / "data" / "perplexity" / "shard001.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in second] == ["gr2"]


def test_a_dataset_that_cannot_be_found_offline_is_one_message(word_tokenizer, tmp_path, capsys):
    word_tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(SystemExit):
        kvsweep("prepare", *["--source", "no-such-org/no-such-dataset", "--subset", "gov_report", "--tokenizer",
                      str(tmp_path / "tok"), "--max-documents", "1", "--max-length", "60", "--shard-size", "1",
                      "--output-dir", str(tmp_path / "data")])  # fmt: skip
    err = capsys.readouterr().err
    assert "dataset 'no-such-org/no-such-dataset' (subset 'gov_report'), split 'validation', could not be loaded" in err
    assert "Traceback" not in err


def test_generation_stops_when_every_document_has_ended(model, monkeypatch):
    from kvsweep.engine.passes import StaticPasses

    prompts = random_documents([25, 31], seed=9)
    free = stream_generate(model, prompts, 8, 40)
    # Every token either document writes at step 0 ends it at once.
    stop = {free[0]["generated_ids"][0], free[1]["generated_ids"][0]}
    passes = []
    run = StaticPasses.run
    monkeypatch.setattr(StaticPasses, "run", lambda self, *a: passes.append(1) or run(self, *a))
    stopped = stream_generate(model, prompts, 8, 40, eos_token_ids=stop)
    assert len(passes) == 4 + 15  # 4 prompt chunks, then decoding stops at the first check (step 15), not 39
    assert [r["n_generated"] for r in stopped] == [0, 0] and [r["generated_ids"] for r in stopped] == [[], []]
    # The cache holds the prompts only (the end-of-sequence token is not fed back).
    assert [r["kv_total"] for r in stopped] == [2 * 2 * 25, 2 * 2 * 31]


def test_one_shard_alone_equals_that_shard_of_the_whole(word_tokenizer, tmp_path):
    """`prepare --shard I` writes what the whole prepare writes as shard I, for both tasks, with the
    short documents skipped before it counted; a shard past the documents is one clear message."""
    word_tokenizer.save_pretrained(tmp_path / "tok")
    source = tmp_path / "reports.jsonl"
    reports = [" ".join(WORDS[: 3 + (i * 7) % 11]) for i in range(12)]
    source.write_text("".join(json.dumps({"report": r, "summary": f"s{i}"}) + "\n" for i, r in enumerate(reports)))
    common = ["--source", str(source), "--tokenizer", str(tmp_path / "tok"), "--max-length", "40",
              "--min-length", "6", "--shard-size", "3", "--tasks", "perplexity", "summarization"]  # fmt: skip
    kvsweep("prepare", *[*common, "--max-documents", "8", "--output-dir", str(tmp_path / "whole")])
    for shard, end in ((0, 3), (1, 6), (2, 8)):
        out = tmp_path / f"alone{shard}"
        kvsweep("prepare", *[*common, "--max-documents", str(end), "--shard", str(shard), "--output-dir", str(out)])
        for task in ("perplexity", "summarization"):
            alone = (out / task / f"shard{shard:03d}.jsonl").read_text()
            assert alone == (tmp_path / "whole" / task / f"shard{shard:03d}.jsonl").read_text()
            assert len(alone.splitlines()) == min(3, 8 - 3 * shard)
            assert sorted(p.name for p in (out / task).iterdir()) == [f"shard{shard:03d}.documents.jsonl", f"shard{shard:03d}.jsonl"]  # fmt: skip
    listed = [json.loads(x)["id"] for s in range(3) for x in (tmp_path / f"alone{s}/perplexity/shard{s:03d}.documents.jsonl").open()]  # fmt: skip
    assert listed == [json.loads(x)["id"] for x in (tmp_path / "whole" / "perplexity" / "documents.jsonl").open()]
    with pytest.raises(SystemExit):
        kvsweep("prepare", *[*common, "--max-documents", "8", "--shard", "3", "--output-dir", str(tmp_path / "x")])
