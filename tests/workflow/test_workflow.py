"""The Snakemake workflow: the CPU demo end to end, dry runs of the real study, reruns of edits."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from workflow_helpers import ROOT, SNAKEMAKE, load_yaml, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow


TASKS = ("perplexity", "summarization", "perplexity_kvpress", "summarization_kvpress")
# The tasks whose kvpress-protocol twin is in the demo too: each gets a protocols/<task> table.
TWINNED = ("perplexity", "summarization")
EXPLICIT = {"h2o": "0.005", "kvzap": "0"}


def summary(workdir, task):
    path = workdir / "results" / "demo" / task / "summary.csv"
    return pd.read_csv(path, dtype={"value": str, "target_density": str}, keep_default_na=False)


def test_demo_produces_tables_and_figures(demo_run):
    workdir, config = demo_run
    results = workdir / "results" / "demo"
    # Every model job left a stage record; job_costs adds them up per kind of job: the 7 evaluations
    # of perplexity, and the 2 probes and 4 searches of the calibration.
    costs = pd.read_csv(results / "perplexity" / "job_costs.csv")
    walls = costs[costs.stage == "wall"].set_index("jobs").seconds
    for kind, outputs in (
        ("evaluation", "perplexity/*/*/shard*.stages.json"),
        ("calibration", "calibration/*/*.stages.json"),
    ):
        records = [json.loads(path.read_text()) for path in results.glob(outputs)]
        assert len(records) == {"evaluation": 7, "calibration": 6}[kind]
        assert walls[kind] == pytest.approx(sum(r["wall_s"] for r in records))
    # The KVzap surrogate's training job is billed as a kind of its own.
    training = json.loads((results / "kvzap_surrogate" / "mlp.stages.json").read_text())
    assert walls["surrogate training"] == pytest.approx(training["wall_s"])
    assert walls["all"] == pytest.approx(walls["evaluation"] + walls["calibration"] + walls["surrogate training"])
    assert "calibration jobs (6):" in (results / "perplexity" / "job_costs.md").read_text()
    table = summary(workdir, "perplexity")
    assert list(table.method) == ["baseline"] + [m for m in ("h2o", "kvzap") for _ in range(3)]
    assert list(table.swept) == [""] + ["threshold"] * 6 and (table.protocol == "streaming").all()
    for method, rows in table[table.method != "baseline"].groupby("method"):
        # One explicit threshold and two calibrated ones, each labelled with its target.
        assert sorted(rows.target_density) == ["", "0.3", "0.6"]
        assert EXPLICIT[method] in set(rows.value[rows.target_density == ""])
        by_threshold = rows.assign(t=rows.value.astype(float)).sort_values("t")
        densities = by_threshold.kv_density.tolist()
        assert densities == sorted(densities, reverse=True), f"{method}: density should fall as the threshold rises"
        # Calibrated on other documents, the thresholds land near their targets on the evaluated ones.
        for _, row in rows[rows.target_density != ""].iterrows():
            assert abs(row.kv_density_compressible - float(row.target_density)) < 0.05, row.to_dict()
    assert (table.n_docs == 10).all() and (table.n_tokens == table.n_tokens.iloc[0]).all()
    compressed = table[table.method != "baseline"]
    assert (compressed.kv_density < 1).all() and (compressed.kv_density > 0).all()
    assert "| baseline" in (results / "perplexity" / "summary.md").read_text()
    figures = [results / "perplexity" / "figures" / f"quality_vs_density.{ext}" for ext in ("png", "pdf")]
    figures += [results / "figures" / f"eviction_map_{m}.{ext}" for m in ("h2o", "kvzap") for ext in ("png", "pdf")]
    for figure in figures:
        assert figure.stat().st_size > 5000, figure
    assert "skipped 1 shorter than 64 tokens" in (results / "logs" / "prepare_perplexity_shard000.log").read_text()


def _falling_densities(rows):
    """A method's rows from the densest to the sparsest, pairs closer than 0.05 in density dropped
    (two thresholds that keep nearly the same cache differ by noise only)."""
    rows = rows.sort_values("kv_density_compressible", ascending=False)
    kept = [rows.iloc[0]]
    for _, row in rows.iloc[1:].iterrows():
        if kept[-1].kv_density_compressible - row.kv_density_compressible >= 0.05:
            kept.append(row)
    return kept


def test_the_demo_shows_quality_falling_with_the_cache(demo_run):
    """The demo model uses what lies far back (its reports state facts once and recall them), so
    evicting more costs more for every method; its summaries end on their own, and lose ROUGE
    beyond noise when most of the cache is evicted."""
    workdir, config = demo_run
    table = summary(workdir, "perplexity")
    for method, rows in table[table.method != "baseline"].groupby("method"):
        assert (rows.delta_nll_ci_high >= 0).all(), f"{method}: a compressed point better than the baseline"
        deltas = [row.delta_nll for row in _falling_densities(rows)]
        assert len(deltas) >= 2 and deltas == sorted(deltas), f"{method}: loss should grow as density falls: {deltas}"
        assert deltas[-1] > 0 and rows.delta_nll_ci_low.max() > 0
    rouge = summary(workdir, "summarization")
    baseline = [
        json.loads(line) for line in (workdir / "results/demo/summarization/baseline/none/shard000.jsonl").open()
    ]
    cap = config["summarization"]["max_new_tokens"]
    assert sum(doc["n_generated"] < cap for doc in baseline) >= 0.8 * len(baseline), "summaries should end themselves"
    sparsest = rouge[rouge.method != "baseline"].sort_values("kv_density").iloc[0]
    assert sparsest.delta_rougeL_ci_high < 0, sparsest.to_dict()


def test_naming_the_trained_surrogate_reruns_nothing(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["model"]["kvzap_surrogate"] = "results/demo/kvzap_surrogate/mlp"
    assert planned_jobs(workdir, write_config(workdir, edited, "named.yaml")) == [("study_config", {})]


def test_a_surrogate_setting_reruns_only_the_kvzap_jobs(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["surrogate"]["epochs"] = 3
    jobs = planned_jobs(workdir, write_config(workdir, edited, "surrogate.yaml"))
    rules = {rule for rule, _ in jobs}
    assert "train_surrogate" in rules and "prepare_surrogate" not in rules
    assert {w["method"] for rule, w in jobs if "method" in w} == {"kvzap"}


def test_demo_runs_both_protocols_side_by_side(demo_run):
    """kvpress's protocol beside streaming: its own summaries, shards that record the context and the
    question, and the protocols table; dropping its tasks plans nothing else again."""
    workdir, config = demo_run
    results = workdir / "results" / "demo"
    kv_heads = load_yaml(results / "demo_assets" / "model" / "config.json")["num_key_value_heads"]
    for task in ("perplexity_kvpress", "summarization_kvpress"):
        table = summary(workdir, task)
        assert len(table) == 10 and (table.n_docs == 10).all() and (table.protocol == "kvpress").all()
        assert (table[table.method != "baseline"].kv_density < 1).all()
        # kvpress's budget: half of each context evicted per KV head, beside the thresholds; KVzip's
        # half of every entry of the context, over all layers and heads at once.
        ratios = table[table.swept == "compression_ratio"]
        assert sorted(ratios.method) == ["h2o", "kvzap", "kvzip"] and set(ratios.value) == {"ratio_0.5"}
        shard = results / "data" / task / "shard000.jsonl"
        context_lengths = {doc["id"]: doc.get("context_length") for doc in map(json.loads, shard.open())}

        def context_length(line, task=task, context_lengths=context_lengths):
            if task == "perplexity_kvpress":
                return line["n_tokens"] - config["perplexity_kvpress"]["continuation_tokens"]
            return context_lengths[line["id"]]

        for line in map(json.loads, (results / task / "kvzap" / "ratio_0.5" / "shard000.jsonl").open()):
            n = context_length(line)
            # Sinks 4 and the window 32 are kept first; nothing after the context is evicted.
            per_head = max(0, min(n - max(1, int(n * 0.5)), n - 4 - 32))
            assert set(line["evicted_per_layer"]) == {per_head * kv_heads}
        for line in map(json.loads, (results / task / "kvzip" / "ratio_0.5" / "shard000.jsonl").open()):
            entries = context_length(line) * kv_heads * len(line["evicted_per_layer"])
            assert sum(line["evicted_per_layer"]) == int(entries * 0.5)
    line = json.loads((results / "data/summarization_kvpress/shard000.jsonl").read_text().splitlines()[0])
    assert line["context"].startswith("You are given a report") and line["question"].endswith("Summary:")
    assert 0 < line["context_length"] < len(line["input_ids"])
    for task in TWINNED:
        table = pd.read_csv(results / "protocols" / f"{task}.csv")
        assert len(table) == 7 and {"gap", "kvpress_kv_density_compressible"} <= set(table.columns)
        assert "Only in the kvpress summary (not compared): " in (results / "protocols" / f"{task}.md").read_text()
        assert (results / "protocols" / f"{task}.png").stat().st_size > 5000
    # kvpress's protocol reads the context in one pass: a new chunk size reruns the streaming jobs
    # (and the calibrations, which stream), not the kvpress-protocol jobs at explicit thresholds.
    rechunked = {**copy.deepcopy(config), "chunk_size": 8}
    jobs = planned_jobs(workdir, write_config(workdir, rechunked, "rechunked.yaml"))
    assert {w["task"] for rule, w in jobs if rule == "evaluate"} == {"perplexity", "summarization"}
    streaming_only = {**copy.deepcopy(config), "tasks": ["perplexity", "summarization"]}
    assert sorted(planned_jobs(workdir, write_config(workdir, streaming_only, "streaming.yaml"))) == [
        ("check_surrogate_documents", {}),
        ("study_config", {}),
    ]


def test_demo_runs_the_summarization_task(demo_run):
    workdir, _ = demo_run
    results = workdir / "results" / "demo" / "summarization"
    table = summary(workdir, "summarization")
    assert len(table) == 7 and (table.n_docs == 10).all()
    baseline = table[table.method == "baseline"].iloc[0]
    assert baseline.delta_rougeL == 0 and 0 < baseline.rougeL <= 100
    assert (table[table.method != "baseline"].kv_density < 1).all()
    # Both tasks use the thresholds the calibrations found.
    assert set(table.value) == set(summary(workdir, "perplexity").value)
    assert (results / "figures" / "quality_vs_density.png").stat().st_size > 5000
    outputs = [json.loads(line) for line in (results / "baseline" / "none" / "shard000.jsonl").read_text().splitlines()]
    assert len(outputs) == 10 and all(o["generated"] and o["references"] and o["n_generated"] > 0 for o in outputs)


def test_calibrations_reach_their_targets_on_documents_never_evaluated(demo_run):
    workdir, config = demo_run
    results = workdir / "results" / "demo"
    evaluated = {
        json.loads(line)["id"] for task in TASKS for line in (results / "data" / task / "documents.jsonl").open()
    }
    calibration = [
        json.loads(line)["id"] for line in (results / "calibration" / "data" / "perplexity" / "documents.jsonl").open()
    ]
    assert len(calibration) == config["calibration"]["documents"] and not evaluated & set(calibration)
    for method in ("h2o", "kvzap"):
        for target in (0.3, 0.6):
            record = json.loads((results / "calibration" / method / f"{target}.json").read_text())
            assert abs(record["density"] - target) <= 0.01 and record["documents"] == calibration
            assert 1 <= len(record["steps"]) <= 10
            assert "step 1: threshold" in (results / "logs" / "calibration" / method / f"{target}.log").read_text()


def test_demo_compares_the_methods_at_equal_density(demo_run):
    workdir, _ = demo_run
    for task in TASKS:
        folder = workdir / "results" / "demo" / task
        points = pd.read_csv(folder / "comparison.csv")
        pairs = list(dict.fromkeys(zip(points.method_a, points.method_b, strict=True)))
        if task.endswith("_kvpress"):  # kvpress's budgets (ratio 0.5) are curves of their own
            # (five curves: h2o, kvzap, and h2o, kvzap and kvzip, KVzap's oracle, at the ratio)
            assert pairs[0] == ("h2o", "kvzap") and ("h2o@ratio", "kvzap@ratio") in pairs and len(pairs) == 10
            assert {"kvzap@ratio", "kvzip@ratio"} in [set(pair) for pair in pairs]
        else:
            assert pairs == [("h2o", "kvzap")]
        for a, b, verdict in zip(points.method_a, points.method_b, points.verdict, strict=True):
            assert verdict in {f"{a} better", f"{b} better", "no significant difference"}
        assert (points.difference_ci_low <= points.difference_ci_high).all()
        both = points[(points.method_a == "h2o") & (points.method_b == "kvzap")]
        assert {0.3, 0.6} <= set(both.density)  # the targets, reached by both on the evaluated documents
        assert len(pd.read_csv(folder / "comparison_auc.csv")) == len(pairs)
        assert "Area under the quality-loss curve" in (folder / "comparison.md").read_text()


def test_nothing_to_do_after_a_finished_run(demo_run):
    workdir, config = demo_run
    assert planned_jobs(workdir, write_config(workdir, config, "same.yaml")) == []


def test_adding_a_threshold_plans_only_that_threshold(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["methods"]["h2o"]["thresholds"] = [0.001, *config["methods"]["h2o"]["thresholds"]]
    jobs = planned_jobs(workdir, write_config(workdir, edited, "added.yaml"))
    evaluations = sorted((w["method"], w["value"], w["shard"]) for rule, w in jobs if rule == "evaluate")
    assert evaluations == [("h2o", "0.001", "000")] * len(TASKS)
    assert sorted(w["task"] for rule, w in jobs if rule == "evaluate") == sorted(TASKS)
    others = sorted((rule, w.get("task")) for rule, w in jobs if rule not in ("evaluate", "study_config"))
    assert others == sorted([(rule, task) for rule in ("comparison", "figures", "score") for task in TASKS]
                            + [("protocols", task) for task in TWINNED])  # fmt: skip
    assert ("study_config", {}) in jobs  # the report's copy of the config


def test_adding_a_compression_ratio_plans_only_its_kvpress_protocol_jobs(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["methods"]["h2o"]["compression_ratios"] = [0.5, 0.75]
    edited["methods"]["kvzap"]["compression_ratios"] = ["5e-1"]  # the same ratio, spelled another way
    jobs = planned_jobs(workdir, write_config(workdir, edited, "ratio.yaml"))
    evaluations = sorted((w["task"], w["method"], w["value"]) for rule, w in jobs if rule == "evaluate")
    assert evaluations == [(task, "h2o", "ratio_0.75") for task in ("perplexity_kvpress", "summarization_kvpress")]
    others = sorted((rule, w.get("task")) for rule, w in jobs if rule not in ("evaluate", "study_config"))
    kvpress_tasks = ("perplexity_kvpress", "summarization_kvpress")
    assert others == sorted([(rule, task) for rule in ("comparison", "figures", "score") for task in kvpress_tasks]
                            + [("protocols", task) for task in TWINNED])  # fmt: skip
    # AdaKV's budget at h2o's ratio: only that ratio's jobs again.
    adaptive = copy.deepcopy(config)
    adaptive["methods"]["h2o"]["adaptive"] = True
    jobs = planned_jobs(workdir, write_config(workdir, adaptive, "adaptive.yaml"))
    evaluations = sorted((w["task"], w["method"], w["value"]) for rule, w in jobs if rule == "evaluate")
    assert evaluations == [(task, "h2o", "ratio_0.5") for task in kvpress_tasks]


def test_streaming_llm_at_compression_ratios_plans_kvpress_protocol_jobs_without_a_window(demo_run):
    """At a ratio StreamingLLM keeps what the budget leaves of recency: its jobs get the ratio and
    its sinks, no window (which `evaluate` would refuse beside a ratio)."""
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["methods"]["streaming_llm"] = {"compression_ratios": [0.5], "sinks": 4}
    path = write_config(workdir, edited, "streaming_ratio.yaml")
    evaluations = sorted(
        (w["task"], w["method"], w["value"]) for rule, w in planned_jobs(workdir, path) if rule == "evaluate"
    )
    assert evaluations == [
        (task, "streaming_llm", "ratio_0.5") for task in ("perplexity_kvpress", "summarization_kvpress")
    ]
    shell = snakemake(workdir, path, "-n", "--printshellcmds").stdout
    commands = [line for line in shell.splitlines() if "--method=streaming_llm" in line]
    assert len(commands) == 2
    assert all("--compression-ratio=0.5" in c and "--sinks=4" in c and "--sliding-window" not in c for c in commands)


def test_decoding_compression_leaves_the_compression_ratios_to_perplexity_kvpress(demo_run):
    """summarization_kvpress with decoding: true evicts while it writes: its thresholds' jobs run
    again, its ratio jobs are not planned (nor read by its summary), and the plan says why."""
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["summarization_kvpress"]["decoding"] = True
    path = write_config(workdir, edited, "decoding.yaml")
    evaluations = {(w["task"], w["value"]) for rule, w in planned_jobs(workdir, path) if rule == "evaluate"}
    assert {task for task, _ in evaluations} == {"summarization_kvpress"}
    assert evaluations and not any(value.startswith("ratio_") for _, value in evaluations)
    assert "summarization_kvpress evaluates no compression ratio" in snakemake(workdir, path, "-n").stderr


def test_adding_a_target_runs_only_its_calibration_and_its_evaluations(demo_run, tmp_path):
    """The plan holds the new target's calibration (its evaluations are planned once it has run:
    their threshold is not known before); the run then evaluates that one threshold only."""
    workdir, config = demo_run
    copy_dir = tmp_path / "copy"
    shutil.copytree(workdir, copy_dir, symlinks=True)
    edited = copy.deepcopy(config)
    edited["methods"]["h2o"]["target_densities"] = [0.3, 0.45, 0.6]
    configfile = write_config(copy_dir, edited, "target.yaml")
    jobs = planned_jobs(copy_dir, configfile)
    assert [(rule, w) for rule, w in jobs if rule == "calibrate"] == [
        ("calibrate", {"method": "h2o", "target": "0.45"})
    ]
    assert not [rule for rule, _ in jobs if rule in ("evaluate", "calibration_probe", "prepare", "eviction_map")]

    result = snakemake(copy_dir, configfile, "--cores", "2")
    ran = result.stdout + result.stderr
    threshold = json.loads((copy_dir / "results/demo/calibration/h2o/0.45.json").read_text())["threshold"]
    evaluated = sorted(re.findall(r"wildcards: task=(\w+), method=(\w+), value=([^,]+), shard=(\d+)", ran))
    assert evaluated == sorted((task, "h2o", threshold, "000") for task in TASKS)
    table = summary(copy_dir, "perplexity")
    assert "0.45" in set(table.target_density) and len(table) == 8
    assert planned_jobs(copy_dir, configfile) == []


def test_respelling_thresholds_and_targets_plans_nothing(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["methods"]["kvzap"]["thresholds"] = ["0.0e0"]
    edited["methods"]["kvzap"]["target_densities"] = [0.30, 6.0e-1]
    edited["methods"]["h2o"]["thresholds"] = ["5.0e-3"]
    assert planned_jobs(workdir, write_config(workdir, edited, "respelled.yaml")) == []


def test_changing_one_methods_window_reruns_only_that_method(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["methods"]["kvzap"]["sliding_window"] = 24
    jobs = planned_jobs(workdir, write_config(workdir, edited, "window.yaml"))
    evaluations = sorted((w["task"], w["method"], w["value"], w["shard"]) for rule, w in jobs if rule == "evaluate")
    # The explicit threshold's jobs and the compression ratio's now; the calibrated ones after the recalibration.
    ratios = [(task, "kvzap", "ratio_0.5", "000") for task in ("perplexity_kvpress", "summarization_kvpress")]
    assert evaluations == sorted([(task, "kvzap", "0", "000") for task in TASKS] + ratios)
    others = sorted(
        (rule, w.get("method") or w.get("task"), w.get("target"))
        for rule, w in jobs
        if rule not in ("evaluate", "study_config")
    )
    assert others == sorted([("calibrate", "kvzap", "0.3"), ("calibrate", "kvzap", "0.6"),
                             ("calibration_probe", "kvzap", None), ("eviction_map", "kvzap", None)]
                            + [(rule, task, None) for rule in ("comparison", "figures", "score") for task in TASKS]
                            + [("protocols", task, None) for task in TWINNED])  # fmt: skip


def test_the_report_holds_figures_tables_config_and_provenance(demo_run, tmp_path):
    workdir, config = demo_run
    configfile = write_config(workdir, config, "report.yaml")
    snakemake(workdir, configfile, "--report", str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png") >= 4  # the two tasks' figures and two eviction maps
    for name in ("summary.csv", "comparison.csv", "comparison_auc.csv", "provenance.csv", "config.yaml"):
        assert name in html
    provenance = pd.read_csv(workdir / "results" / "demo" / "perplexity" / "provenance.csv")
    assert set(provenance.device) == {"cpu"} and set(provenance.dtype) == {"float32"}
    assert provenance.n_docs.sum() == 7 * 10 and all(len(str(c).split("+")[0]) == 40 for c in provenance.kvsweep)


def test_speed_settings_rerun_nothing(demo_run):
    """batch_size, cuda_graphs and the GPUs a job splits its model over change speed, never
    results: editing them plans no job."""
    workdir, config = demo_run
    edited = {**copy.deepcopy(config), "batch_size": 1, "cuda_graphs": not config.get("cuda_graphs", True),
              "gpus_per_job": 1}  # fmt: skip
    assert planned_jobs(workdir, write_config(workdir, edited, "speed.yaml")) == []


def test_dry_run_of_the_shipped_study_needs_no_gpu_or_network(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # undone after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jobs = planned_jobs(tmp_path, ROOT / "config.yaml")
    counts = pd.Series([rule for rule, _ in jobs]).value_counts().to_dict()
    # Before calibration: one shard (100 documents of up to 8,192 tokens within shard_tokens) x
    # (baseline + the explicit thresholds: 2 + 2 + 1), one figure per compressed method, and the
    # calibrations of 3 methods x 9 target densities (with a probe each).
    assert counts == {"evaluate": 6, "eviction_map": 3, "prepare": 1, "document_list": 1, "score": 1, "comparison": 1,
                      "figures": 1, "prepare_calibration": 1, "calibration_probe": 3, "calibrate": 27,
                      "study_config": 1}  # fmt: skip
    thresholds = {w["value"] for rule, w in jobs if rule == "evaluate" and w["method"] == "h2o"}
    assert thresholds == {"0.0005"}
    result = snakemake(tmp_path, ROOT / "config.yaml", "--dry-run")
    assert (
        "27 calibration job(s) for target densities come first; the evaluation jobs at the thresholds" in result.stderr
    )


BLOCK_GPU_STACK = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "kvpress", "triton", "transformers"):
            raise ImportError(f"{name} is not installed on this login node")

sys.meta_path.insert(0, _NotInstalled())
"""


def test_planning_needs_no_gpu_stack(tmp_path, monkeypatch):
    """A login node plans the study and the demo with the workflow's light dependencies only:
    reading the method and task registries imports no torch, kvpress, triton or transformers."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_GPU_STACK)
    monkeypatch.setenv("PYTHONPATH", str(blocker))
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed on this login node" in probe.stderr  # the blocker works
    study = planned_jobs(tmp_path, ROOT / "config.yaml")
    assert len([rule for rule, _ in study if rule == "evaluate"]) == 6
    demo = planned_jobs(tmp_path, ROOT / "demo" / "config.yaml")
    assert any(rule == "evaluate" for rule, _ in demo)
    config = subprocess.run([sys.executable, "-m", "kvsweep.study.config", str(ROOT / "config.yaml")], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{blocker}:{ROOT / 'src'}"})  # fmt: skip
    assert config.returncode == 0, config.stderr


def test_cuda_graphs_off_reaches_every_job_that_runs_the_model(tmp_path):
    config = load_yaml(ROOT / "config.yaml")
    default = snakemake(tmp_path, write_config(tmp_path, config), "--dry-run", "--printshellcmds").stdout
    config["cuda_graphs"] = False
    off = snakemake(tmp_path, write_config(tmp_path, config, "off.yaml"), "--dry-run", "--printshellcmds").stdout
    # 6 evaluations, 3 eviction maps, 3 calibration probes and 27 calibrations.
    assert default.count("--cuda-graphs=auto") == 39 and "--cuda-graphs=off" not in default
    assert off.count("--cuda-graphs=off") == 39 and "--cuda-graphs=auto" not in off
    assert default.count("--batch-size=8") == 36
    # An entry named after its method passes exactly what earlier versions passed (its params and
    # shell are unchanged): a change of the method code alone reruns none of a study's evaluations.
    assert "--method=h2o --threshold=0.0005 --local-window=512 --sinks=0 --output=" in default
    assert "--method=kvzap --threshold=-5 --sliding-window=128 --sinks=4 --kvzap-surrogate=" in default


def test_invalid_config_stops_before_any_job_with_one_message(tmp_path):
    config = load_yaml(ROOT / "demo" / "config.yaml")
    config["methods"]["h2o"]["thresholds"] = [0.1, "ten"]
    result = snakemake(tmp_path, write_config(tmp_path, config), "--dry-run", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "invalid config: methods.h2o.thresholds[1]: threshold 'ten' is not a number (write e.g. -5, 0.0005, 5.0e-4 or -inf)"
    )
    assert "Traceback" not in result.stderr


def test_dropping_a_task_or_editing_its_fields_reruns_only_that_task(demo_run):
    """Each task is prepared by its own job with only its own settings."""
    workdir, config = demo_run
    only_perplexity = {**copy.deepcopy(config), "tasks": ["perplexity"]}
    # Only the config's copy, and the cheap check of the surrogate's documents against the lists
    # left (the surrogate itself is not retrained).
    assert sorted(planned_jobs(workdir, write_config(workdir, only_perplexity, "one_task.yaml"))) == [
        ("check_surrogate_documents", {}),
        ("study_config", {}),
    ]

    edited = copy.deepcopy(config)
    edited["dataset"]["summary_field"] = "abstract"
    jobs = [
        job
        for job in planned_jobs(workdir, write_config(workdir, edited, "summary_field.yaml"))
        if job[0] not in ("study_config", "check_surrogate_documents")  # the latter reads the rewritten list
    ]
    assert {w.get("task") for _, w in jobs} == {"summarization", "summarization_kvpress"}
    assert sorted(rule for rule, _ in jobs if rule != "evaluate") == sorted(
        ["comparison", "document_list", "figures", "prepare", "score"] * 2 + ["protocols"]
    )
    assert len([rule for rule, _ in jobs if rule == "evaluate"]) == 17  # 7 streaming; 7 and 3 ratios in kvpress's


def test_replacing_the_surrogate_reruns_only_the_methods_that_read_it(demo_run, tmp_path):
    workdir, config = demo_run
    copied = tmp_path / "surrogate"
    shutil.copytree(workdir / "results" / "demo" / "kvzap_surrogate" / "mlp", copied)
    edited = copy.deepcopy(config)
    edited["model"]["kvzap_surrogate"] = str(copied)
    jobs = [
        job
        for job in planned_jobs(workdir, write_config(workdir, edited, "surrogate.yaml"))
        if job[0] != "study_config"
    ]
    kvzap = {"kvzap"}
    assert not {"train_surrogate", "prepare_surrogate"} & {rule for rule, _ in jobs}  # a given surrogate is used as is
    assert {w["method"] for rule, w in jobs if rule in ("evaluate", "eviction_map", "calibrate")} == kvzap
    # The explicit threshold's jobs now (one per task) and the compression ratio's (one per task in
    # kvpress's protocol); the calibrated ones follow the recalibration with the new surrogate.
    assert len([rule for rule, _ in jobs if rule == "evaluate"]) == len(TASKS) + 2
    assert sorted((w["method"], w["target"]) for rule, w in jobs if rule == "calibrate") == [
        (m, t) for m in sorted(kvzap) for t in ("0.3", "0.6")
    ]


def test_config_strings_are_never_interpreted_by_a_shell(demo_run, tmp_path):
    """Hostile or merely unusual values (spaces, $(...), backquotes, quotes, semicolons) in every
    string the rules pass on: each reaches the program as one argument, and no shell runs them."""
    workdir, config = demo_run
    assets = workdir / "results" / "demo" / "demo_assets"
    model = tmp_path / "my model; touch model-marker"
    surrogate = tmp_path / "surrogate $(touch surrogate-marker)"
    shutil.copytree(assets / "model", model)
    shutil.copytree(workdir / "results" / "demo" / "kvzap_surrogate" / "mlp", surrogate)
    text, summary, ident = (
        "the report $(touch text-marker)",
        "summary `touch summary-marker`",
        "doc id'; touch id-marker; '",
    )
    source = tmp_path / "data $(touch source-marker).jsonl"
    records = [json.loads(line) for line in (assets / "govreport.jsonl").read_text().splitlines()]
    source.write_text("".join(json.dumps({text: r["report"], summary: r["summary"], ident: r["id"] + " x"}) + "\n"
                              for r in records))  # fmt: skip
    hostile = copy.deepcopy(config)
    hostile["run"] = "hostile"
    hostile["model"].update(name=str(model), kvzap_surrogate=str(surrogate))
    hostile["dataset"].update(source=str(source), split="validation $(touch split-marker)", text_field=text,
                              summary_field=summary, id_field=ident)  # fmt: skip
    results = tmp_path / "results" / "hostile"
    targets = [
        "results/hostile/data/summarization/documents.jsonl",
        "results/hostile/perplexity/kvzap/0/shard000.jsonl",
    ]
    snakemake(tmp_path, write_config(tmp_path, hostile), "--cores", "2", *targets)
    markers = [p for folder in (tmp_path, workdir, ROOT) for p in folder.rglob("*-marker") if p.is_file()]
    assert markers == []
    documents = [json.loads(line) for line in (results / "data" / "summarization" / "documents.jsonl").open()]
    assert documents[0]["id"] == "demo-000 x"
    assert len((results / "perplexity" / "kvzap" / "0" / "shard000.jsonl").read_text().splitlines()) == 10


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("run", "..", "invalid config: run: '..' does not match"),
        (
            "model.name",
            "./models/no-such-model",
            "invalid config: model.name './models/no-such-model': no such local folder",
        ),
        (
            "dataset.source",
            "data/no-such.jsonl",
            "invalid config: dataset.source 'data/no-such.jsonl': no such local folder",
        ),
        (
            "model.name",
            "empty-folder",
            "invalid config: model.name: model 'empty-folder': the folder holds no config.json",
        ),
        (
            "dataset.source",
            "empty-folder/reports.txt",
            "invalid config: dataset.source: 'empty-folder/reports.txt' is a local file but not a .jsonl",
        ),
    ],
)
def test_bad_values_stop_the_plan_with_one_message(tmp_path, key, value, message):
    (tmp_path / "empty-folder").mkdir()  # an existing folder that holds no model
    (tmp_path / "empty-folder" / "reports.txt").write_text("{}\n")
    config = load_yaml(ROOT / "config.yaml")
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    result = snakemake(tmp_path, write_config(tmp_path, config), "--dry-run", check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists() and not (ROOT / "data").exists()


def small_study_running(demo_run, tmp_path):
    """A one-method perplexity study at chunk 1 (jobs long enough to be killed in), started in its
    own session on the demo's assets; returns once its first job's log exists: (workdir, config,
    configfile, command, the Snakemake process, the logs folder, the running job's log, and the
    deadline of 300 s from the start that the test's later waits share)."""
    workdir, config = demo_run
    shutil.copytree(workdir / "results" / "demo" / "demo_assets", tmp_path / "results" / "demo" / "demo_assets")
    small = copy.deepcopy(config)
    small["tasks"], small["chunk_size"] = ["perplexity"], 1
    small["methods"] = {"baseline": None, "h2o": {"thresholds": [0.005], "local_window": 32}}
    configfile = write_config(tmp_path, small)
    command = [*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(configfile), "--cores", "1"]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    logs = tmp_path / "results" / "demo" / "logs" / "perplexity"
    deadline = time.time() + 300
    while time.time() < deadline and not list(logs.rglob("*.log")):
        time.sleep(0.2)
    return workdir, config, configfile, command, job, logs, next(logs.rglob("*.log")), deadline


def test_after_snakemake_is_killed_the_documented_commands_finish_the_run(demo_run, tmp_path):
    """Snakemake killed with SIGKILL (a lost login session) leaves its lock and the outputs of the
    jobs it was running marked incomplete. docs/cluster.md's two commands (`--unlock`, then the same
    command) finish the run: rerun-incomplete is on for every run through the workflow profile."""
    workdir, config, configfile, command, job, logs, running, deadline = small_study_running(demo_run, tmp_path)
    os.killpg(job.pid, signal.SIGKILL)  # Snakemake and its job, as a lost session would
    job.wait()
    # What a non-atomic writer could have left behind: the running job's output, half written.
    output = tmp_path / "results" / "demo" / "perplexity" / running.relative_to(logs).with_suffix(".jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text('{"id": "demo-000", "nll_su')

    blocked = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert blocked.returncode != 0 and "cannot be locked" in blocked.stderr + blocked.stdout
    subprocess.run([*command, "--unlock"], cwd=ROOT, check=True, capture_output=True)
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert all(json.loads(line)["nll_sum"] > 0 for line in output.read_text().splitlines())
    assert (tmp_path / "results" / "demo" / "perplexity" / "summary.csv").exists()


def test_windows_and_typed_entries_rerun_only_what_changed(demo_run, tmp_path):
    """streaming_llm sweeps its window and `type:` runs a method under another name; the summary
    says what was swept, and adding a window (or respelling one) plans only what changed."""
    workdir, config = demo_run
    shutil.copytree(workdir / "results" / "demo" / "demo_assets", tmp_path / "results" / "demo" / "demo_assets")
    study = copy.deepcopy(config)
    study["tasks"] = ["perplexity"]
    study["methods"] = {
        "baseline": None,
        "streaming_llm": {"sliding_windows": [64], "sinks": 4},
        "h2o_w64": {"type": "h2o", "thresholds": [0.005], "local_window": 64},
    }
    snakemake(tmp_path, write_config(tmp_path, study), "--cores", "2")
    table = pd.read_csv(tmp_path / "results" / "demo" / "perplexity" / "summary.csv", keep_default_na=False)
    rows = {row.method: row for row in table.itertuples()}
    assert (rows["streaming_llm"].swept, str(rows["streaming_llm"].value)) == ("sliding_window", "64")
    assert (rows["h2o_w64"].swept, str(rows["h2o_w64"].value)) == ("threshold", "0.005")
    # A window of 64 and 4 sinks keep 68 positions of each document (of up to 512 tokens).
    assert 0 < rows["streaming_llm"].kv_density < 0.6 and rows["streaming_llm"].kv_density_compressible == 0
    assert (
        "`streaming_llm`: its configurations do not spread along kv_density_compressible"
        in (tmp_path / "results" / "demo" / "perplexity" / "comparison.md").read_text()
    )

    wider = copy.deepcopy(study)
    wider["methods"]["streaming_llm"]["sliding_windows"] = [64.0, 128]
    jobs = planned_jobs(tmp_path, write_config(tmp_path, wider, "wider.yaml"))
    assert [(w["method"], w["value"]) for rule, w in jobs if rule == "evaluate"] == [("streaming_llm", "128")]
    shell = snakemake(tmp_path, write_config(tmp_path, wider, "wider.yaml"), "-n", "--printshellcmds").stdout
    assert "--method=streaming_llm --sliding-window=128 --sinks=4" in shell
    respelled = copy.deepcopy(study)
    respelled["methods"]["streaming_llm"]["sliding_windows"] = [64.0]
    respelled["methods"]["h2o_w64"]["thresholds"] = ["5.0e-3"]
    assert planned_jobs(tmp_path, write_config(tmp_path, respelled, "respelled.yaml")) == []
    # A typed entry passes its method after the entry's name; an edit of its window reruns it alone.
    h2o_wider = copy.deepcopy(study)
    h2o_wider["methods"]["h2o_w64"]["local_window"] = 96
    shell = snakemake(tmp_path, write_config(tmp_path, h2o_wider, "h2o.yaml"), "-n", "--printshellcmds").stdout
    assert "--method=h2o_w64 --method=h2o --threshold=0.005 --local-window=96 --sinks=0" in shell
    jobs = planned_jobs(tmp_path, write_config(tmp_path, h2o_wider, "h2o.yaml"))
    assert {w["method"] for rule, w in jobs if rule in ("evaluate", "eviction_map")} == {"h2o_w64"}


def test_adding_documents_plans_only_the_new_shards(demo_run, tmp_path):
    """Shards are fixed runs of documents in source order, each prepared by its own job: growing
    the study from 4 to 8 documents (shards of 4) prepares and evaluates the new shard only; the
    first shard, its jobs and their results stay. Every evaluation leaves a stage record, and the
    score step adds them up (job_costs.csv)."""
    workdir, config = demo_run
    shutil.copytree(workdir / "results" / "demo" / "demo_assets", tmp_path / "results" / "demo" / "demo_assets")
    study = copy.deepcopy(config)
    study["tasks"] = ["perplexity"]
    study["methods"] = {"baseline": None, "h2o": {"thresholds": [0.005]}}
    study["dataset"].update(max_documents=4, shard_size=4)
    snakemake(tmp_path, write_config(tmp_path, study), "--cores", "2")
    results = tmp_path / "results" / "demo"
    first = results / "perplexity" / "h2o" / "0.005" / "shard000.jsonl"
    before = first.read_text()
    costs = pd.read_csv(results / "perplexity" / "job_costs.csv")
    costs = costs[costs.jobs == "evaluation"].set_index("stage")
    records = sorted(results.glob("perplexity/*/*/shard*.stages.json"))
    assert len(records) == 2  # baseline and h2o, one shard each
    wall = sum(json.loads(path.read_text())["wall_s"] for path in records)
    assert costs.seconds["wall"] == pytest.approx(wall)
    assert costs.seconds.drop("wall").sum() == pytest.approx(wall)
    assert costs.seconds["model_work"] > 0 and costs.seconds["imports"] > 0

    grown = copy.deepcopy(study)
    grown["dataset"]["max_documents"] = 8
    jobs = planned_jobs(tmp_path, write_config(tmp_path, grown, "grown.yaml"))
    assert sorted((rule, w.get("shard")) for rule, w in jobs if rule in ("prepare", "evaluate")) == [
        ("evaluate", "001"), ("evaluate", "001"), ("prepare", "001")
    ]  # fmt: skip
    snakemake(tmp_path, write_config(tmp_path, grown, "grown.yaml"), "--cores", "2")
    assert first.read_text() == before
    listed = [json.loads(line)["id"] for line in (results / "data" / "perplexity" / "documents.jsonl").open()]
    shards = [json.loads(line)["id"] for s in ("000", "001") for line in (results / "data" / "perplexity" / f"shard{s}.jsonl").open()]  # fmt: skip
    assert listed == shards and len(set(listed)) == 8
    table = pd.read_csv(results / "perplexity" / "summary.csv", keep_default_na=False)
    assert set(table.n_docs) == {8}


def copied_demo(demo_run, tmp_path):
    """A copy of the finished demo (results and Snakemake's records), for a test that changes it."""
    workdir, config = demo_run
    copy_dir = tmp_path / "copy"
    shutil.copytree(workdir, copy_dir, symlinks=True)
    return copy_dir, config, write_config(copy_dir, config, "same.yaml")


def test_a_deleted_result_is_evaluated_again_and_the_tables_follow(demo_run, tmp_path):
    """Snakemake reruns nothing for a file deleted under outputs that exist; every evaluation is a
    target of the workflow, so the tables can never keep the numbers of a result that is gone."""
    copy_dir, config, configfile = copied_demo(demo_run, tmp_path)
    results = copy_dir / "results" / "demo"
    calibrated = json.loads((results / "calibration" / "h2o" / "0.3.json").read_text())["threshold"]
    for deleted in ("perplexity/baseline/none/shard000.jsonl", f"summarization/h2o/{calibrated}/shard000.jsonl"):
        (results / deleted).unlink()
    jobs = planned_jobs(copy_dir, configfile)
    evaluations = sorted((w["task"], w["method"], w["value"]) for rule, w in jobs if rule == "evaluate")
    assert evaluations == [("perplexity", "baseline", "none"), ("summarization", "h2o", calibrated)]
    # The two tasks whose results were deleted (the kvpress-protocol twins' are all there).
    assert sorted(w["task"] for rule, w in jobs if rule == "score") == ["perplexity", "summarization"]


def test_a_model_path_spelled_another_way_plans_nothing(demo_run):
    workdir, config = demo_run
    for spelling in ("./results/demo/demo_assets/model", str(workdir / "results/demo/demo_assets/model") + "/"):
        edited = copy.deepcopy(config)
        edited["model"]["name"] = spelling
        edited["dataset"]["source"] = "./" + config["dataset"]["source"]
        assert planned_jobs(workdir, write_config(workdir, edited, "respelled.yaml")) == [], spelling


def test_records_appended_to_the_source_rerun_nothing_and_an_edited_one_reruns_its_readers(demo_run, tmp_path):
    """A prepare job reruns when a record it read changes, not when the source file merely grows:
    the demo reads 42 of its 48 reports (10 studied, 8 to calibrate on, 20 for the surrogate, and
    those too short in between)."""
    copy_dir, config, configfile = copied_demo(demo_run, tmp_path)
    source = copy_dir / config["dataset"]["source"]
    lines = source.read_text().splitlines()
    source.write_text("\n".join(lines + [lines[-1]]) + "\n")
    assert planned_jobs(copy_dir, configfile) == []
    record = json.loads(lines[12])  # a calibration document (after the 10 studied and one too short)
    record["report"] = record["report"].replace(" ", "  ", 1)
    source.write_text("\n".join(lines[:12] + [json.dumps(record)] + lines[13:]) + "\n")
    prepared = {rule for rule, _ in planned_jobs(copy_dir, configfile) if rule.startswith("prepare")}
    assert prepared == {"prepare_calibration", "prepare_surrogate"}


def test_a_cut_calibration_record_stops_the_plan_with_one_message(demo_run, tmp_path):
    copy_dir, config, configfile = copied_demo(demo_run, tmp_path)
    record = copy_dir / "results" / "demo" / "calibration" / "kvzap" / "0.3.json"
    for content in (record.read_text()[:40], json.dumps({"target_density": 0.3, "density": 0.3})):
        record.write_text(content)
        result = snakemake(copy_dir, configfile, "--dry-run", check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert (
            last.startswith("unreadable calibration: ") and "0.3.json" in last and "calibrate this target again" in last
        )


def test_a_config_with_a_key_twice_or_not_utf8_stops_the_plan_with_one_message(tmp_path):
    text = (ROOT / "demo" / "config.yaml").read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "\nrun: another\n")
    result = snakemake(tmp_path, twice, "--dry-run", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "key 'run' appears twice in one mapping" in result.stderr.strip().splitlines()[-1]
    # The default config.yaml of a working directory (no --configfile), in Latin-1.
    (tmp_path / "config.yaml").write_bytes(text.replace("# The CPU demo", "# The CPU d\u00e9mo").encode("latin-1"))
    command = [*SNAKEMAKE, "--directory", str(tmp_path), "--dry-run"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config.yaml, line 1: not UTF-8 text" in result.stderr.strip().splitlines()[-1]


def test_a_source_path_with_braces_stops_the_plan_with_one_message(tmp_path):
    config = load_yaml(ROOT / "demo" / "config.yaml")
    folder = tmp_path / "data{x}"
    folder.mkdir()
    (folder / "reports.jsonl").write_text('{"report": "text"}\n')
    config["dataset"]["source"] = "data{x}/reports.jsonl"
    result = snakemake(tmp_path, write_config(tmp_path, config), "--dry-run", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "dataset.source: 'data{x}/reports.jsonl'" in result.stderr.strip().splitlines()[-1]


def test_weights_the_workflow_writes_are_readable_by_others(demo_run):
    workdir, _ = demo_run
    for folder in ("demo_assets/model", "kvzap_surrogate/mlp"):
        files = [p for p in (workdir / "results" / "demo" / folder).rglob("*") if p.is_file()]
        assert files and all(p.stat().st_mode & 0o044 == 0o044 for p in files), folder


def test_after_snakemake_alone_is_killed_its_finished_jobs_are_kept(demo_run, tmp_path):
    """Snakemake killed hard while a job runs: the job runs on alone and finishes. docs/cluster.md's
    recovery (wait, `--unlock`, `--touch` the outputs those jobs wrote) keeps its output; only what
    was left is planned."""
    workdir, config, configfile, command, job, logs, running, deadline = small_study_running(demo_run, tmp_path)
    os.kill(job.pid, signal.SIGKILL)  # Snakemake alone: its job runs on
    job.wait()
    output = tmp_path / "results" / "demo" / "perplexity" / running.relative_to(logs).with_suffix(".jsonl")
    while time.time() < deadline and not output.with_suffix(".stages.json").exists():
        time.sleep(0.2)
    assert output.exists(), "the orphaned job should finish on its own"
    written = output.read_text()

    subprocess.run([*command, "--unlock"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([*command, "--touch", str(output.relative_to(tmp_path))], cwd=ROOT, check=True, capture_output=True)
    jobs = planned_jobs(tmp_path, configfile)
    evaluations = [w["method"] for rule, w in jobs if rule == "evaluate"]
    assert output.parent.parent.name not in evaluations and len(evaluations) == 1
    snakemake(tmp_path, configfile, "--cores", "2")
    assert output.read_text() == written
