"""The `kvsweep evaluate` command: outputs, clear errors, atomic output and resuming."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kvsweep.cli import parser
from kvsweep.cli.evaluate import options_of
from kvsweep.engine.methods import build_press
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.stages.evaluate import fingerprint as fingerprint_of
from kvsweep.stages.model_jobs import load_shard, resolve_method
from kvsweep.study.methods import get_method

from conftest import kvsweep, random_documents, tiny_llama, tiny_surrogate

FIELDS = {
    "id",
    "n_tokens",
    "nll_sum",
    "n_predicted",
    "kv_kept",
    "kv_total",
    "kv_kept_compressible",
    "kv_total_compressible",
    "kv_cache_bytes",
    "provenance",
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
    kvsweep("evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", out, *extra))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["doc0", "doc1", "doc2"]  # input order, though batched by length
    assert all(set(line) == FIELDS for line in lines)
    import torch

    assert lines[0]["provenance"]["torch"] == torch.__version__
    assert (lines[0]["provenance"]["device"], lines[0]["provenance"]["dtype"]) == ("cpu", "float32")
    assert len(lines[0]["provenance"]["kvsweep"].split("+")[0]) == 40  # the commit of this checkout
    assert lines[0]["provenance"]["protocol"] == "streaming"
    assert lines[1]["n_tokens"] == 64  # truncated to --max-length
    method = get_method("kvzap")
    settings = method.resolve(0.0, {"sliding_window": 6, "kvzap_surrogate": surrogate_dir})
    expected = stream_nll(model, [d["input_ids"][:64] for d in docs], 4, build_press(method, 0.0, settings))
    for line, exp in zip(lines, expected, strict=True):
        assert line["nll_sum"] == pytest.approx(exp["nll_sum"], rel=1e-5)
        assert line["kv_kept"] == exp["kv_kept"] < line["kv_total"]
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_stage_record_adds_up_to_the_wall_time(model_dir, surrogate_dir, tmp_path):
    """A job (its own process, as in the workflow) leaves <output>.stages.json: the stages add up
    to its wall time, which matches the time measured around the process within a few percent,
    and each stage holds what it names (the imports are most of a tiny model's job)."""
    write_shard(tmp_path / "shard.jsonl", [50, 80, 12, 30, 40])
    out = tmp_path / "run" / "shard000.jsonl"
    extra = ["--method", "kvzap", "--threshold", "0", "--sliding-window", "6", "--kvzap-surrogate", surrogate_dir]
    command = [sys.executable, "-m", "kvsweep", "evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", out, *extra)]
    start = time.time()
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    outside = time.time() - start
    record = json.loads((tmp_path / "run" / "shard000.stages.json").read_text())
    stages = record["stages_s"]
    assert list(stages) == ["startup", "imports", "model_load", "surrogate_load", "graph_capture", "model_work",
                            "writing", "other"]  # fmt: skip
    assert sum(stages.values()) == pytest.approx(record["wall_s"], rel=1e-9)
    assert record["wall_s"] == pytest.approx(outside, rel=0.05)  # only the exec and the exit are left out
    assert all(seconds >= 0 for seconds in stages.values())
    assert stages["imports"] > stages["model_load"] > 0 and stages["startup"] > 0 and stages["model_work"] > 0
    assert stages["other"] < 0.05 * record["wall_s"]  # the named stages cover the job
    assert (record["documents"], record["tokens"], record["gpus"]) == (5, 50 + 64 + 12 + 30 + 40, 0)
    assert record["model_work_share"] == pytest.approx(stages["model_work"] / record["wall_s"])


def test_stage_clock_bills_nested_stages_once(monkeypatch):
    """An inner stage's time (a graph capture inside the model's work) is taken out of the outer
    one; what no stage claims is `other`, and the stages add up to the wall time."""
    from kvsweep.core import timing as stages

    now = [100.0]
    monkeypatch.setattr(stages.time, "time", lambda: now[0])
    clock = stages.StageClock(start=99.0)  # one second of start-up
    with clock.stage("model_work"):
        now[0] += 2
        with clock.stage("graph_capture"):
            now[0] += 3
        now[0] += 4
    now[0] += 0.5  # unclaimed
    record = clock.record()
    assert {k: v for k, v in record["stages_s"].items() if v} == {
        "startup": 1.0, "graph_capture": 3.0, "model_work": 6.0, "other": 0.5
    }  # fmt: skip
    assert record["wall_s"] == 10.5 and record["model_work_share"] == 6.0 / 10.5
    with pytest.raises(ValueError, match="unknown stage 'loading'"):
        with clock.stage("loading"):
            pass


BAD_INPUTS = [
    (["--method", "pyramidkv", "--threshold", "1"], "unknown method 'pyramidkv'; known methods: baseline, kvzap"),
    (["--method", "snapkv", "--window-size", "8"], "method 'snapkv' runs at a compression ratio only"),
    (["--method", "h2o", "--threshold", "nan"], "threshold NaN is not allowed"),
    (["--method", "h2o", "--threshold", "1e400"], "threshold inf is +infinity (a number too large for a float"),
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
        kvsweep("evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", *extra))
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
        kvsweep(
            "evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", "--method", "baseline")
        )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_model_gives_one_clear_message(tmp_path, capsys):
    write_shard(tmp_path / "shard.jsonl", [20])
    with pytest.raises(SystemExit):
        kvsweep(
            "evaluate",
            *cli_args(
                "no-such-org/no-such-model", tmp_path / "shard.jsonl", tmp_path / "o.jsonl", "--method", "baseline"
            ),
        )
    err = capsys.readouterr().err
    assert "model 'no-such-org/no-such-model' could not be loaded" in err and "Traceback" not in err


def test_resume_skips_finished_documents(model_dir, tmp_path, monkeypatch):
    """A job that dies after its first batch resumes with only the unfinished documents."""
    write_shard(tmp_path / "shard.jsonl", [30, 25, 20, 15, 10])
    method = ["--method", "h2o", "--threshold", "0.05", "--local-window", "4"]
    args = cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", *method)
    kvsweep("evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "reference.jsonl", *method))

    killed_after_first_batch(monkeypatch, args)
    assert not (tmp_path / "out.jsonl").exists(), "a killed job must not leave a complete-looking output"
    assert len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 1 + 2

    computed = []

    def counting(model, documents, chunk, press, **options):
        computed.extend(len(d) for d in documents)
        return stream_nll(model, documents, chunk, press, **options)

    monkeypatch.setattr("kvsweep.engine.stream_nll.stream_nll", counting)
    kvsweep("evaluate", *args)
    assert sorted(computed) == [10, 15, 20]  # the two longest were done before the kill
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "reference.jsonl").read_text()


def test_resume_after_sigkill(model_dir, tmp_path):
    """Kill a real evaluation process part-way through a shard; the rerun completes it identically."""
    write_shard(tmp_path / "shard.jsonl", [64] * 12)
    base = [sys.executable, "-m", "kvsweep", "evaluate", "--model", model_dir, "--data", str(tmp_path / "shard.jsonl"),
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


def killed_after_first_batch(monkeypatch, args):
    """Run the CLI with `args` and kill it (KeyboardInterrupt) after its first batch: the
    checkpoint then holds a real fingerprint and one batch of results."""
    calls = []

    def dies(model, documents, chunk, press, **options):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return stream_nll(model, documents, chunk, press, **options)

    monkeypatch.setattr("kvsweep.engine.stream_nll.stream_nll", dies)
    with pytest.raises(KeyboardInterrupt):
        kvsweep("evaluate", *args)
    monkeypatch.setattr("kvsweep.engine.stream_nll.stream_nll", stream_nll)


def retrain_in_place(folder, seed):
    """The same folder, other weights (a model or surrogate trained again and saved over itself)."""
    if (folder / "config.json").read_text().count('"kvzap"'):
        tiny_surrogate(tiny_llama(), seed=seed).save_pretrained(folder)
    else:
        tiny_llama(seed=seed).save_pretrained(folder)


# What a stale checkpoint must not survive: each changes the results, not only the command line.
CHANGES = ["threshold", "window", "chunk_size", "shard_content", "model_weights", "surrogate_weights"]


@pytest.mark.parametrize("change", CHANGES)
def test_a_checkpoint_of_other_inputs_is_not_reused(model, tmp_path, monkeypatch, change):
    model_dir, surrogate_dir = tmp_path / "model", tmp_path / "surrogate"
    model.save_pretrained(model_dir)
    tiny_surrogate(model).save_pretrained(surrogate_dir)
    shard = tmp_path / "shard.jsonl"
    write_shard(shard, [30, 25, 20, 15])
    options = {"--threshold": "0", "--sliding-window": "4", "--chunk-size": "4"}

    def args(output):
        extra = ["--method", "kvzap", "--kvzap-surrogate", str(surrogate_dir), "--batch-size", "2"]
        extra += [item for pair in options.items() for item in pair]
        return [*cli_args(str(model_dir), shard, output), *extra]

    killed_after_first_batch(monkeypatch, args(tmp_path / "out.jsonl"))
    assert len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 1 + 2

    if change == "threshold":
        options["--threshold"] = "0.05"
    elif change == "window":
        options["--sliding-window"] = "6"
    elif change == "chunk_size":
        options["--chunk-size"] = "5"
    elif change == "shard_content":  # same ids, other tokens (e.g. prepared from another text field)
        write_shard(shard, [30, 25, 20, 15], seed=9)
    else:
        retrain_in_place(model_dir if change == "model_weights" else surrogate_dir, seed=7)

    kvsweep("evaluate", *args(tmp_path / "fresh.jsonl"))
    kvsweep("evaluate", *args(tmp_path / "out.jsonl"))
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "fresh.jsonl").read_text()


def test_unchanged_inputs_do_reuse_the_checkpoint(model_dir, tmp_path, monkeypatch, capsys):
    """The other side of the fingerprint: the same inputs resume (so the test above can fail)."""
    write_shard(tmp_path / "shard.jsonl", [30, 25, 20, 15])
    args = cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", "--method", "h2o",
                    "--threshold", "0.05", "--local-window", "4")  # fmt: skip
    killed_after_first_batch(monkeypatch, args)
    kvsweep("evaluate", *args)
    assert "resuming: 2 of 4 documents already done" in capsys.readouterr().err


@pytest.mark.parametrize(
    "checkpoint",
    [
        "not json at all\n",
        '["a list"]\n',
        '{"fingerprint": "x"\n',
        "\udcff\n",
        "{fingerprint}\n[1, 2]\n",
        '{fingerprint}\n{{"id": "doc0"}}\n',
        '{fingerprint}\n{{"id": ["doc0"]}}\n',
    ],
    ids=["garbage_header", "list_header", "cut_header", "bad_bytes", "list_record", "record_without_fields", "odd_id"],
)
def test_a_corrupt_checkpoint_is_recomputed(model_dir, tmp_path, capsys, checkpoint):
    """Whatever a crash or a disk left in the checkpoint, the job recomputes (rather than failing
    on every retry) and its output equals a clean run's."""
    write_shard(tmp_path / "shard.jsonl", [20, 18])
    args = cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", "--method", "baseline")
    kvsweep(
        "evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "clean.jsonl", "--method", "baseline")
    )
    parsed = options_of(parser().parse_args(["evaluate", *map(str, args)]))
    _, settings = resolve_method(parsed)
    documents = load_shard(parsed.data, parsed.max_length)
    header = json.dumps({"fingerprint": fingerprint_of(parsed, settings, documents)})
    text = checkpoint.replace("{fingerprint}", header).replace("{{", "{").replace("}}", "}")
    (tmp_path / "out.jsonl.partial").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    kvsweep("evaluate", *args)
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "clean.jsonl").read_text()
    assert "Traceback" not in capsys.readouterr().err


def test_a_line_cut_short_by_a_kill_is_dropped_and_recomputed(model_dir, tmp_path, monkeypatch):
    write_shard(tmp_path / "shard.jsonl", [20, 18, 16, 14])
    args = cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "out.jsonl", "--method", "baseline",
                    "--batch-size", "1")  # fmt: skip
    kvsweep("evaluate", *args)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    (tmp_path / "out.jsonl").unlink()
    partial = tmp_path / "out.jsonl.partial"
    parsed = options_of(parser().parse_args(["evaluate", *map(str, args)]))
    fingerprint = fingerprint_of(parsed, {}, load_shard(parsed.data, parsed.max_length))
    partial.write_text(json.dumps({"fingerprint": fingerprint}) + "\n" + lines[0] + "\n" + lines[1][:25])

    # A resumed run killed again after one document: its checkpoint holds only whole lines.
    killed_after_first_batch(monkeypatch, args)
    kept = [json.loads(line) for line in partial.read_text().splitlines()]  # raises on a fragment
    assert [k.get("id") for k in kept] == [None, "doc0", "doc1"]

    kvsweep("evaluate", *args)
    assert (tmp_path / "out.jsonl").read_text().splitlines() == lines


def test_token_ids_outside_the_vocabulary_are_one_message(model_dir, tmp_path, capsys):
    (tmp_path / "shard.jsonl").write_text(json.dumps({"id": "a", "input_ids": [5, 96, 500, 7]}) + "\n")
    with pytest.raises(SystemExit):
        kvsweep(
            "evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "o.jsonl", "--method", "baseline")
        )
    err = capsys.readouterr().err
    assert "document 'a' holds token id 500, outside the model's vocabulary of 97" in err
    assert "Traceback" not in err


def test_a_surrogate_path_that_holds_a_model_is_one_message(model_dir, tmp_path, capsys):
    write_shard(tmp_path / "shard.jsonl", [20])
    extra = ["--method", "kvzap", "--threshold", "0", "--kvzap-surrogate", model_dir]
    with pytest.raises(SystemExit):
        kvsweep("evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "o.jsonl", *extra))
    err = capsys.readouterr().err
    assert f"KVzap surrogate '{model_dir}' holds a model of type 'llama', not a KVzap surrogate" in err
    assert "Traceback" not in err


def test_an_output_folder_that_cannot_be_made_is_one_message_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    write_shard(tmp_path / "shard.jsonl", [20])
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("kvsweep.engine.stream_nll.stream_nll", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(SystemExit):
        kvsweep("evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "a_file" / "out.jsonl",
                               "--method", "baseline"))  # fmt: skip
    err = capsys.readouterr().err
    assert "cannot create the folder of" in err and "a_file/out.jsonl" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "models/llama/v2"])
def test_a_missing_local_model_folder_is_not_called_a_hub_id(tmp_path, capsys, name):
    write_shard(tmp_path / "shard.jsonl", [20])
    with pytest.raises(SystemExit):
        kvsweep("evaluate", *cli_args(name, tmp_path / "shard.jsonl", tmp_path / "o.jsonl", "--method", "baseline"))
    err = capsys.readouterr().err
    assert f"model '{name}': no such local folder or file" in err and "hub id" not in err


def test_outputs_get_the_permissions_of_the_umask(model_dir, tmp_path):
    write_shard(tmp_path / "shard.jsonl", [20])
    previous = os.umask(0o022)
    try:
        kvsweep(
            "evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "o.jsonl", "--method", "baseline")
        )
    finally:
        os.umask(previous)
    assert (tmp_path / "o.jsonl").stat().st_mode & 0o777 == 0o644
