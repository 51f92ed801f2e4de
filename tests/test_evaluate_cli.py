"""The `python -m kvsweep.evaluate` command: outputs, clear errors, atomic output and resuming."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from kvsweep import evaluate
from kvsweep.methods import get_method
from kvsweep.stream_nll import stream_nll

from conftest import random_documents

FIELDS = {
    "id",
    "n_tokens",
    "nll_sum",
    "n_predicted",
    "kv_kept",
    "kv_total",
    "kv_kept_compressible",
    "kv_total_compressible",
}


def write_shard(path, lengths, seed=2):
    docs = [{"id": f"doc{i}", "input_ids": ids} for i, ids in enumerate(random_documents(lengths, seed))]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def cli_args(model_dir, shard, output, *extra):
    return ["--model", model_dir, "--data", str(shard), "--chunk-size", "4", "--max-length", "64",
            "--batch-size", "2", "--output", str(output), *extra]  # fmt: skip


def test_output_matches_engine(model, model_dir, surrogate_dir, tmp_path):
    docs = write_shard(tmp_path / "shard.jsonl", [50, 80, 12])
    out = tmp_path / "out.jsonl"
    extra = ["--method", "kvzap", "--threshold", "0", "--sliding-window", "6", "--kvzap-surrogate", surrogate_dir,
             "--cuda-graphs=off"]  # fmt: skip
    evaluate.main(cli_args(model_dir, tmp_path / "shard.jsonl", out, *extra))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["doc0", "doc1", "doc2"]  # input order, though batched by length
    assert all(set(line) == FIELDS for line in lines)
    assert lines[1]["n_tokens"] == 64  # truncated to --max-length
    method = get_method("kvzap")
    settings = method.resolve(0.0, {"sliding_window": 6, "kvzap_surrogate": surrogate_dir})
    expected = stream_nll(model, [d["input_ids"][:64] for d in docs], 4, method.build(0.0, **settings))
    for line, exp in zip(lines, expected, strict=True):
        assert line["nll_sum"] == pytest.approx(exp["nll_sum"], rel=1e-5)
        assert line["kv_kept"] == exp["kv_kept"] < line["kv_total"]
    assert not (tmp_path / "out.jsonl.partial").exists()


BAD_INPUTS = [
    (["--method", "snapkv", "--threshold", "1"], "unknown method 'snapkv'; known methods: baseline, kvzap"),
    (["--method", "h2o", "--threshold", "nan"], "threshold must be a number"),
    (["--method", "baseline", "--threshold", "0.5"], "method 'baseline' takes no threshold"),
    (["--method", "h2o"], "method 'h2o' needs a threshold"),
    (["--method", "h2o", "--threshold", "0.1", "--sliding-window", "4"], "does not take sliding_window"),
    (["--method", "kvzap", "--threshold", "0", "--kvzap-type", "cnn"], "kvzap_type must be one of mlp, linear"),
    (["--method", "kvzap", "--threshold", "0", "--kvzap-surrogate", "nvidia/KVzap-mlp-NoSuchModel"],
     "KVzap surrogate 'nvidia/KVzap-mlp-NoSuchModel' could not be loaded"),
    (["--method", "kvzap", "--threshold", "0"], "KVzap surrogate 'nvidia/KVzap-mlp-model"),
]  # fmt: skip


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_arguments_give_one_clear_message(model_dir, tmp_path, capsys, extra, message):
    write_shard(tmp_path / "shard.jsonl", [20])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": "a", "input_ids": [5]}\n', "document 'a' has 1 token(s); at least 2 are needed"),
        ('{"id": "a", "input_ids": []}\n', "document 'a' has 0 token(s)"),
        ('{"id": "a", "text": "hello"}\n', "line 1: missing field(s) input_ids"),
        ('{"id": "a", "input_ids": [1, 2]}\n{"id": "a", "input_ids": [1, 2]}\n', "document id 'a' appears twice"),
        ('{"id": "a", "input_ids": ["x", 2]}\n', "input_ids must be a list of token ids"),
        ("not json\n", "line 1: not valid JSON"),
    ],
)
def test_bad_shards_give_one_clear_message(model_dir, tmp_path, capsys, content, message):
    (tmp_path / "shard.jsonl").write_text(content)
    with pytest.raises(SystemExit):
        evaluate.main(cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", "--method", "baseline"))
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_model_gives_one_clear_message(tmp_path, capsys):
    write_shard(tmp_path / "shard.jsonl", [20])
    with pytest.raises(SystemExit):
        evaluate.main(
            cli_args(
                "no-such-org/no-such-model", tmp_path / "shard.jsonl", tmp_path / "o.jsonl", "--method", "baseline"
            )
        )
    err = capsys.readouterr().err
    assert "model 'no-such-org/no-such-model' could not be loaded" in err and "Traceback" not in err


def test_resume_skips_finished_documents(model_dir, tmp_path, monkeypatch):
    """A job that dies after its first batch resumes with only the unfinished documents."""
    write_shard(tmp_path / "shard.jsonl", [30, 25, 20, 15, 10])
    method = ["--method", "h2o", "--threshold", "0.05", "--local-window", "4"]
    args = cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", *method)
    evaluate.main(cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "reference.jsonl", *method))

    seen = []

    def dies_after_first_batch(model, documents, chunk, press, **options):
        if seen:
            raise KeyboardInterrupt("killed")
        seen.append(len(documents))
        return stream_nll(model, documents, chunk, press, **options)

    monkeypatch.setattr("kvsweep.stream_nll.stream_nll", dies_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(args)
    assert not (tmp_path / "out.jsonl").exists(), "a killed job must not leave a complete-looking output"
    assert len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 1 + 2

    computed = []

    def counting(model, documents, chunk, press, **options):
        computed.extend(len(d) for d in documents)
        return stream_nll(model, documents, chunk, press, **options)

    monkeypatch.setattr("kvsweep.stream_nll.stream_nll", counting)
    evaluate.main(args)
    assert sorted(computed) == [10, 15, 20]  # the two longest were done before the kill
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "reference.jsonl").read_text()


def test_resume_after_sigkill(model_dir, tmp_path):
    """Kill a real evaluation process part-way through a shard; the rerun completes it identically."""
    write_shard(tmp_path / "shard.jsonl", [64] * 12)
    base = [sys.executable, "-m", "kvsweep.evaluate", "--model", model_dir, "--data", str(tmp_path / "shard.jsonl"),
            "--chunk-size", "1", "--max-length", "64", "--batch-size", "1", "--method", "h2o",
            "--threshold", "0.05", "--local-window", "4"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*base, "--output", str(tmp_path / "reference.jsonl")], check=True, env=env, capture_output=True)

    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    job = subprocess.Popen([*base, "--output", str(out)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and len(partial.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = len(partial.read_text().splitlines()) - 1
    assert 2 <= finished < 12, "the kill should land part-way through the shard"
    assert not out.exists()

    rerun = subprocess.run([*base, "--output", str(out)], env=env, capture_output=True, text=True, check=True)
    assert f"resuming: {finished} of 12 documents already done" in rerun.stderr
    assert out.read_text() == (tmp_path / "reference.jsonl").read_text()
    assert not partial.exists()


def test_changed_settings_do_not_reuse_a_checkpoint(model_dir, tmp_path):
    write_shard(tmp_path / "shard.jsonl", [20, 20])
    args = cli_args(
        model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", "--method", "h2o", "--threshold", "0.05"
    )
    evaluate.main(args)
    stale = tmp_path / "out.jsonl.partial"
    stale.write_text(
        json.dumps({"fingerprint": "other-settings"}) + "\n" + json.dumps({"id": "doc0", "nll_sum": -1}) + "\n"
    )
    evaluate.main(args)
    assert all(json.loads(line)["nll_sum"] > 0 for line in (tmp_path / "out.jsonl").read_text().splitlines())
    assert math.isfinite(json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])["nll_sum"])


def test_a_line_cut_short_by_a_kill_is_dropped_and_recomputed(model_dir, tmp_path, monkeypatch):
    write_shard(tmp_path / "shard.jsonl", [20, 18, 16, 14])
    args = cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", "--method", "baseline",
                    "--batch-size", "1")  # fmt: skip
    evaluate.main(args)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    (tmp_path / "out.jsonl").unlink()
    partial = tmp_path / "out.jsonl.partial"
    fingerprint = evaluate._fingerprint(evaluate.parse_args(args), {})
    partial.write_text(json.dumps({"fingerprint": fingerprint}) + "\n" + lines[0] + "\n" + lines[1][:25])

    # A resumed run killed again after one document: its checkpoint holds only whole lines.
    calls = []

    def dies_after_one(model, documents, chunk, press, **options):
        if calls:
            raise KeyboardInterrupt("killed again")
        calls.append(1)
        return stream_nll(model, documents, chunk, press, **options)

    monkeypatch.setattr("kvsweep.stream_nll.stream_nll", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(args)
    kept = [json.loads(line) for line in partial.read_text().splitlines()]  # raises on a fragment
    assert [k.get("id") for k in kept] == [None, "doc0", "doc1"]

    monkeypatch.setattr("kvsweep.stream_nll.stream_nll", stream_nll)
    evaluate.main(args)
    assert (tmp_path / "out.jsonl").read_text().splitlines() == lines
