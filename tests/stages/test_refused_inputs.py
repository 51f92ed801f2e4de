"""Bad input, misuse and faults: each is one readable message (or the right behaviour), never a
traceback, a silent result or lost work."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from test_evaluate import cli_args, write_shard

from kvsweep.analysis import calibration_search
from kvsweep.analysis.results import load_results, read_calibrations
from kvsweep.cli import parser
from kvsweep.cli.evaluate import options_of
from kvsweep.core.errors import KvsweepError
from kvsweep.stages import evaluate
from kvsweep.stages.model_jobs import load_shard, resolve_method
from kvsweep.study.config import validate_config
from kvsweep.study.config_files import read_config_file

from conftest import kvsweep

ROOT = Path(__file__).resolve().parents[2]
SRC = str(ROOT / "src")


def minimal(**changes) -> dict:
    config = {"run": "x", "model": {"name": "m"}, "dataset": {"source": "d.jsonl"}, "methods": {"baseline": None}}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config.setdefault(section, {}) if section else config)[name] = value
    return config


def refused(config: dict, message: str) -> None:
    with pytest.raises(KvsweepError, match=message):
        validate_config(config)


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`python -m kvsweep ARGS` as a process."""
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "kvsweep", *args], capture_output=True, text=True, cwd=cwd, env=env)


def one_line_error(capsys, program: str, call) -> str:
    """`call()` exits with a readable error of `program`; its message."""
    with pytest.raises(SystemExit) as stopped:
        call()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{program}: error: " in err, err
    return err


# --- the config file -----------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("run: a\nmodel: {name: m}\nrun: b\n")
    with pytest.raises(KvsweepError, match=r"line 3: key 'run' appears twice in one mapping \(first at line 1\)"):
        read_config_file(path)
    path.write_text("methods:\n  h2o: {thresholds: [0.1]}\n  h2o: {thresholds: [0.2]}\n")
    with pytest.raises(KvsweepError, match="key 'h2o' appears twice"):
        read_config_file(path)
    # A merge key may be overridden: that is not a repetition.
    path.write_text("base: &b {name: m, dtype: float32}\nmodel:\n  <<: *b\n  dtype: bfloat16\n")
    assert read_config_file(path)["model"] == {"name": "m", "dtype": "bfloat16"}


def test_a_config_file_that_is_not_utf8_is_one_message(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_bytes("run: caf\u00e9\nmodel: {name: m}\n".encode("latin-1"))
    with pytest.raises(KvsweepError, match=r"line 1: not UTF-8 text \(byte 0xe9\)"):
        read_config_file(path)
    result = run_cli("config", str(path))
    assert result.returncode == 2 and "not UTF-8 text" in result.stderr and "Traceback" not in result.stderr


def test_the_config_command_has_help():
    result = run_cli("config", "--help")
    assert result.returncode == 0 and "usage:" in result.stdout and "error" not in result.stderr


def test_whole_numbers_written_as_floats_reach_commands_as_integers():
    config = validate_config(minimal(**{"dataset.max_length": 512.0, "comparison.length_buckets": [4096.0]}))
    assert config["dataset"]["max_length"] == 512 and type(config["dataset"]["max_length"]) is int
    assert config["comparison"]["length_buckets"] == [4096] and type(config["comparison"]["length_buckets"][0]) is int
    refused(minimal(**{"dataset.max_length": 512.5}), "max_length: 512.5 is not of type 'integer'")


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_bootstrap_seed_numpy_refuses_is_refused_before_any_job(seed):
    refused(minimal(**{"bootstrap.seed": seed}), "bootstrap.seed")


def test_a_study_of_too_many_jobs_is_refused_at_once():
    started = time.perf_counter()
    refused(minimal(**{"dataset.max_documents": 10**12}), "dataset.max_documents: 1000000000000 is greater than")
    refused(minimal(**{"dataset.max_documents": 5000, "dataset.shard_size": 1}), "5000 evaluation jobs per method")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    "method,thresholds,message",
    [
        ("random", [1.5, -0.5], r"random.thresholds\[0\]: threshold 1.5 is outside \[0, 1\]"),
        ("random", [0.5, -0.5], r"random.thresholds\[1\]: threshold -0.5 is outside \[0, 1\]"),
        ("h2o", [-0.001], r"threshold -0.001 is outside \[0, 1\]"),
        ("knorm", [0.5], r"threshold 0.5 is outside \[-inf, 0\]"),
        ("expected_attention", [-1], r"threshold -1 is outside \[0, inf\]"),
    ],
)
def test_thresholds_outside_their_methods_range_are_refused(method, thresholds, message):
    refused(minimal(**{f"methods.{method}": {"thresholds": thresholds}}), message)


def test_thresholds_inside_the_range_and_minus_infinity_are_taken():
    config = validate_config(
        minimal(**{"methods.random": {"thresholds": ["-inf", 0, 1]}, "methods.kvzap": {"thresholds": [-30, 5]}})
    )
    assert config["methods"]["random"]["canonical_values"] == ["-inf", "0", "1"]


def test_the_evaluate_command_refuses_a_threshold_outside_the_range(model_dir, tmp_path, capsys):
    write_shard(tmp_path / "shard.jsonl", [20])
    args = cli_args(
        model_dir, tmp_path / "shard.jsonl", tmp_path / "o.jsonl", "--method", "random", "--threshold", "1.5"
    )
    err = one_line_error(capsys, "kvsweep evaluate", lambda: kvsweep("evaluate", *args))
    assert "threshold 1.5 is outside [0, 1]" in err


def test_a_local_path_holding_braces_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data{x}").mkdir()
    (tmp_path / "data{x}" / "gov.jsonl").write_text("{}\n")
    refused(minimal(**{"dataset.source": "data{x}/gov.jsonl"}), r"dataset.source: 'data\{x\}/gov.jsonl': .* wildcard")


def test_a_local_path_has_one_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    for spelling in ("models/m", "./models/m", "models//m/", str(tmp_path / "models" / "m"), "models/../models/m"):
        assert validate_config(minimal(**{"model.name": spelling}))["model"]["name"] == "models/m", spelling
    for spelling in (str(outside), f"../{tmp_path.name}-outside"):
        assert validate_config(minimal(**{"model.name": spelling}))["model"]["name"] == str(outside)
    assert (
        validate_config(minimal(**{"model.name": "meta-llama/Llama-3.1-8B"}))["model"]["name"]
        == "meta-llama/Llama-3.1-8B"
    )


# --- score and comparison ------------------------------------------------------------------------


def result(i, nll=10.0):
    return {"id": f"d{i}", "n_tokens": 10, "nll_sum": nll + i, "n_predicted": 9, "kv_kept": 50, "kv_total": 100,
            "kv_kept_compressible": 30, "kv_total_compressible": 80}  # fmt: skip


def write_results(tmp_path, method, value, ids, shard="000", nll=10.0):
    path = tmp_path / "perplexity" / method / value / f"shard{shard}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(result(i, nll)) + "\n" for i in ids))
    return str(path)


def write_listing(tmp_path, ids, shard="000"):
    path = tmp_path / "data" / "perplexity" / f"shard{shard}.documents.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"d{i}", "index": i}) + "\n" for i in ids))
    return str(path)


def test_a_shard_missing_documents_is_refused(tmp_path):
    base = write_results(tmp_path, "baseline", "none", range(10))
    short = write_results(tmp_path, "h2o", "0.1", range(7), nll=11.0)
    with pytest.raises(
        KvsweepError, match=r"h2o at 0.1: 7 documents where the baseline has 10: 3 missing \(d7, d8, d9\)"
    ):
        load_results([base, short])
    # Against the prepared shard's list, even when the baseline lost the same lines.
    short_base = write_results(tmp_path, "baseline", "none", range(7))
    with pytest.raises(
        KvsweepError,
        match=r"baseline/none/shard000.jsonl: holds 7 documents where its prepared shard lists 10: 3 missing",
    ):
        load_results([short_base, short], documents=[write_listing(tmp_path, range(10))])


def test_duplicated_lines_and_a_file_given_twice_are_refused(tmp_path):
    base = write_results(tmp_path, "baseline", "none", range(4))
    doubled = write_results(tmp_path, "h2o", "0.1", [0, 1, 2, 3, 3, 2])
    with pytest.raises(KvsweepError, match=r"h2o at 0.1: document\(s\) \['d2', 'd3'\] appear more than once"):
        load_results([base, doubled])
    with pytest.raises(KvsweepError, match="given twice"):
        load_results([base, base])
    with pytest.raises(KvsweepError, match="given twice"):
        load_results([base, str(Path(base).parent / "." / "shard000.jsonl")])


def test_shards_that_hold_exactly_their_documents_are_taken(tmp_path):
    paths = [write_results(tmp_path, m, v, range(4 * s, 4 * s + 4), shard=f"00{s}") for m, v in
             (("baseline", "none"), ("h2o", "0.1")) for s in (0, 1)]  # fmt: skip
    listings = [write_listing(tmp_path, range(4 * s, 4 * s + 4), shard=f"00{s}") for s in (0, 1)]
    assert len(load_results(paths, documents=listings)) == 16
    with pytest.raises(KvsweepError, match="no prepared shard 001"):
        load_results(paths, documents=listings[:1])


def test_the_score_command_refuses_bad_bootstrap_settings_and_paths(tmp_path, capsys):
    base = write_results(tmp_path, "baseline", "none", range(4))
    out = ["--output-csv", str(tmp_path / "s.csv"), "--output-md", str(tmp_path / "s.md")]
    for flags, message in (
        (["--confidence", "1.5"], "argument --confidence: must lie in (0, 1), got 1.5"),
        (["--n-resamples", "0"], "argument --n-resamples: must be >= 100, got 0"),
        (["--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
    ):
        err = one_line_error(
            capsys, "kvsweep score", lambda flags=flags: kvsweep("score", "--inputs", base, *out, *flags)
        )
        assert message in err
    assert not (tmp_path / "s.csv").exists()
    (tmp_path / "notes.jsonl").write_text(open(base).read())
    err = one_line_error(capsys, "kvsweep score", lambda: kvsweep("score", "--inputs", tmp_path / "notes.jsonl", *out))
    assert "notes.jsonl: not an evaluation result" in err
    err = one_line_error(
        capsys, "kvsweep score", lambda: kvsweep("score", "--inputs", tmp_path / "a/b/shard000.jsonl", *out)
    )
    assert "shard000.jsonl: no such file" in err


def test_the_comparison_command_refuses_results_that_do_not_pair(tmp_path, capsys):
    paths = [write_results(tmp_path, "baseline", "none", range(10)), write_results(tmp_path, "h2o", "0.1", range(7)),
             write_results(tmp_path, "kvzap", "-5", range(10))]  # fmt: skip
    out = ["--output-csv", str(tmp_path / "c.csv"), "--output-auc-csv", str(tmp_path / "a.csv"),
           "--output-md", str(tmp_path / "c.md")]  # fmt: skip
    err = one_line_error(capsys, "kvsweep comparison", lambda: kvsweep("comparison", "--inputs", *paths, *out))
    assert "h2o at 0.1: 7 documents where the baseline has 10" in err


def test_a_stage_record_or_a_cut_record_among_calibrations_is_one_message(tmp_path, capsys):
    folder = tmp_path / "calibration" / "h2o"
    folder.mkdir(parents=True)
    (folder / "0.3.json").write_text(json.dumps({"target_density": 0.3, "threshold": "0.01", "density": 0.31}))
    (folder / "0.3.stages.json").write_text(json.dumps({"wall_s": 1.0, "stages_s": {}}))
    (folder / "0.4.json").write_text('{"target_density": 0.4, "thresh')
    assert read_calibrations([folder / "0.3.json"])[0]["method"] == "h2o"
    with pytest.raises(KvsweepError, match="0.3.stages.json: a job's stage record, not a calibration record"):
        read_calibrations(sorted(folder.glob("0.*.json")))
    with pytest.raises(KvsweepError, match="0.4.json: not a whole calibration record"):
        read_calibrations([folder / "0.4.json"])
    paths = [write_results(tmp_path, "baseline", "none", range(4)), write_results(tmp_path, "h2o", "0.01", range(4))]
    out = ["--output-csv", str(tmp_path / "c.csv"), "--output-auc-csv", str(tmp_path / "a.csv"),
           "--output-md", str(tmp_path / "c.md")]  # fmt: skip
    calibrations = [str(p) for p in sorted(folder.glob("0.3*.json"))]
    err = one_line_error(
        capsys,
        "kvsweep comparison",
        lambda: kvsweep("comparison", "--inputs", *paths, "--calibrations", *calibrations, *out),
    )
    assert "a job's stage record" in err


# --- calibration ---------------------------------------------------------------------------------


def calibrate_args(model_dir, tmp_path, command, method, *extra):
    write_shard(tmp_path / "shard.jsonl", [30, 30])
    return [command, "--model", model_dir, "--data", str(tmp_path / "shard.jsonl"), "--method", method,
            "--chunk-size", "4", "--max-length", "64", "--output", str(tmp_path / "out.json"), *extra]  # fmt: skip


@pytest.mark.parametrize("content", [None, '{"documents": ["doc0", "doc1"], "quanti', '{"documents": []}'])
def test_a_missing_or_cut_probe_is_one_message(model_dir, tmp_path, capsys, content):
    probe = tmp_path / "probe.json"
    if content is not None:
        probe.write_text(content)
    args = calibrate_args(model_dir, tmp_path, "search", "h2o", "--probe", str(probe), "--target-density", "0.5")
    err = one_line_error(capsys, "kvsweep calibrate", lambda: kvsweep("calibrate", *args))
    assert f"probe {probe}: " in err and "probe" in err.split(": ", 3)[-1]


def test_calibrating_the_baseline_says_there_is_nothing_to_calibrate(model_dir, tmp_path, capsys):
    err = one_line_error(
        capsys,
        "kvsweep calibrate",
        lambda: kvsweep("calibrate", *calibrate_args(model_dir, tmp_path, "probe", "baseline")),
    )
    assert "method 'baseline' has no threshold along which density falls: nothing to calibrate" in err
    assert "takes no threshold" not in err


def test_the_search_stays_inside_the_methods_range():
    import numpy as np

    quantiles = np.linspace(0.2, 0.9, 1001)  # scores of a probability; the density never gets low enough
    tried = []

    def measure(threshold):
        tried.append(threshold)
        return 0.6

    with pytest.raises(KvsweepError, match=r"reached the highest threshold of the method's range \(1\)"):
        calibration_search.search(measure, quantiles, 0.1, 0.01, 10, log=lambda line: None, limits=(0.0, 1.0))
    assert max(tried) == 1.0 and min(tried) >= 0.0


# --- outputs and jobs ----------------------------------------------------------------------------


def test_folders_of_weights_are_written_readable_by_others(tmp_path):
    import torch
    from safetensors.torch import save_file

    from kvsweep.core.io import atomic_folder

    mask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as staging:
            save_file({"w": torch.zeros(2)}, staging / "model.safetensors")  # safetensors writes 0600
            (staging / "sub").mkdir(mode=0o700)
            (staging / "sub" / "config.json").write_text("{}")
    finally:
        os.umask(mask)
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in [tmp_path / "model", *(tmp_path / "model").rglob("*")]
    }
    assert modes == {
        "model": 0o755,
        "model/model.safetensors": 0o644,
        "model/sub": 0o755,
        "model/sub/config.json": 0o644,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left


def test_a_failed_folder_write_leaves_nothing_that_looks_complete(tmp_path):
    from kvsweep.core.io import atomic_folder

    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model") as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


JOB = """
import sys, time
sys.path.insert(0, {src!r})
from kvsweep.core.job import start_job
start_job("kvsweep test")
print("started", flush=True)
time.sleep(8)
open({marker!r}, "w").write("finished")
"""


@pytest.mark.parametrize("workflow_job", [True, False])
def test_a_workflow_job_ends_with_its_shell(tmp_path, workflow_job):
    """Killing a workflow job's shell ends its Python process (which would otherwise write its
    output after Snakemake had marked the job failed); a command run by hand is left alone."""
    marker = tmp_path / "finished"
    script = tmp_path / "job.py"
    script.write_text(JOB.format(src=SRC, marker=str(marker)))
    env = {k: v for k, v in os.environ.items() if k != "KVSWEEP_DIE_WITH_PARENT"}
    if workflow_job:
        env["KVSWEEP_DIE_WITH_PARENT"] = "1"
    # `; true` keeps bash as the parent (it would exec a lone command).
    shell = subprocess.Popen(
        ["bash", "-c", f"{sys.executable} {script}; true"], stdout=subprocess.PIPE, env=env, text=True
    )
    assert shell.stdout.readline().strip() == "started"
    child = int(subprocess.run(["pgrep", "-P", str(shell.pid)], capture_output=True, text=True).stdout.split()[0])
    shell.send_signal(signal.SIGKILL)
    shell.wait()
    deadline = time.time() + 15
    while time.time() < deadline and Path(f"/proc/{child}").exists() and not marker.exists():
        time.sleep(0.05)
    if workflow_job:
        assert not marker.exists() and not _alive(child)
    else:
        while time.time() < deadline and not marker.exists():
            time.sleep(0.05)
        assert marker.exists()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except OSError:
        return False


def test_a_resumed_job_keeps_the_batches_of_the_first_attempt(model_dir, tmp_path):
    """A job killed while writing a batch resumes with that batch as it was (a finished document of
    it included), not regrouped: its numbers are the uninterrupted job's, to the last bit."""
    write_shard(tmp_path / "shard.jsonl", [40, 31, 23, 14, 9])
    method = ["--method", "h2o", "--threshold", "0.05", "--local-window", "4", "--chunk-size", "3"]
    kvsweep("evaluate", *cli_args(model_dir, tmp_path / "shard.jsonl", tmp_path / "reference.jsonl", *method))
    reference = [json.loads(line) for line in (tmp_path / "reference.jsonl").read_text().splitlines()]
    # Killed after writing the first line of its first batch ([40, 31]): its checkpoint holds doc0.
    out = tmp_path / "out.jsonl"
    args = cli_args(model_dir, tmp_path / "shard.jsonl", out, *method)
    options = options_of(parser().parse_args(["evaluate", *map(str, args)]))
    _, settings = resolve_method(options)
    documents = load_shard(str(tmp_path / "shard.jsonl"), 64)
    fingerprint = evaluate.fingerprint(options, settings, documents)
    Path(f"{out}.partial").write_text(json.dumps({"fingerprint": fingerprint}) + "\n" + json.dumps(reference[0]) + "\n")
    kvsweep("evaluate", *args)
    assert out.read_text() == (tmp_path / "reference.jsonl").read_text()


def test_planned_batches_do_not_depend_on_what_is_done():
    docs = [{"id": f"d{i}", "input_ids": [1] * n} for i, n in enumerate([5, 40, 12, 40, 7])]
    batches = evaluate.planned_batches(docs, 2)
    assert [[d["id"] for d in b] for b in batches] == [["d1", "d3"], ["d2", "d4"], ["d0"]]


# --- the `kernels` package -----------------------------------------------------------------------

# What transformers 5.x makes of `apply_rotary_pos_emb` when Hugging Face's `kernels` package (0.11 to
# 0.13) is installed: a module instance whose forward calls the function (`use_kernel_func_from_hub`).
WRAP_LIKE_KERNELS = """
import sys
from torch import nn
import transformers.models.llama.modeling_llama as llama
import transformers.models.qwen3.modeling_qwen3 as qwen3

def wrapped(function):
    class Func(nn.Module):
        def forward(self, *args, **kwargs):
            return function(*args, **kwargs)
    return Func()

for module in (llama, qwen3):
    module.apply_rotary_pos_emb = wrapped(module.apply_rotary_pos_emb)
"""


def test_kvsweep_runs_where_transformers_wraps_its_rope_in_a_module(model_dir, tmp_path):
    write_shard(tmp_path / "shard.jsonl", [30, 20])
    common = ["--model", model_dir, "--data", str(tmp_path / "shard.jsonl"), "--chunk-size", "4", "--max-length",
              "64", "--method", "h2o", "--threshold", "0.05", "--local-window", "4"]  # fmt: skip
    script = WRAP_LIKE_KERNELS + textwrap.dedent(f"""
        assert type(llama.apply_rotary_pos_emb).__name__ == "Func"
        from kvsweep.cli import main
        main(["evaluate", *{[*common, "--output", str(tmp_path / "wrapped.jsonl")]!r}])
    """)
    wrapped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    assert wrapped.returncode == 0, wrapped.stderr[-2000:]
    kvsweep("evaluate", *[*common, "--output", str(tmp_path / "plain.jsonl")])
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "provenance"} for line in path.open()]  # noqa: E731
    assert strip(tmp_path / "wrapped.jsonl") == strip(tmp_path / "plain.jsonl")


def test_the_fused_rope_families_compute_rope_as_llama_does():
    """The families declared with Llama's RoPE have its functions in the installed transformers."""
    import importlib
    import inspect

    from kvsweep.engine.integration.families import FAMILIES

    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    for family in [f.name for f in FAMILIES if f.rope]:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        for name in ("apply_rotary_pos_emb", "rotate_half"):
            assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(llama, name)), (family, name)


@pytest.mark.parametrize(
    "installed,refused", [("0.19.1", True), ("0.17.0", True), ("0.16.2", False), ("0.11.7", False)]
)
def test_a_kernels_package_that_breaks_transformers_is_one_message(monkeypatch, installed, refused):
    from kvsweep.core import compatibility

    real = compatibility.version
    monkeypatch.setattr(compatibility, "version", lambda name: installed if name == "kernels" else real(name))
    if refused:
        with pytest.raises(KvsweepError, match=f"`kernels` {installed} is installed.*pip install 'kernels<0.17'"):
            compatibility.check_kernels_package()
    else:
        compatibility.check_kernels_package()


def test_validation_leaves_a_valid_config_as_it_was(tmp_path):
    config = yaml.safe_load((ROOT / "demo" / "config.yaml").read_text())
    once = validate_config(config)
    assert validate_config(json.loads(json.dumps(once))) == once
