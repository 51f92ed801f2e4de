"""The Snakemake workflow: the CPU demo end to end, dry runs of the real study, reruns of edits."""

import copy
import json
import os

import pandas as pd
import pytest

from workflow_helpers import ROOT, load_yaml, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow


def test_demo_produces_tables_and_figures(demo_run):
    workdir, config = demo_run
    results = workdir / "results" / "demo"
    table = pd.read_csv(results / "perplexity" / "summary.csv", dtype={"threshold": str}, keep_default_na=False)
    expected = [("baseline", "")] + [(m, t) for m in ("h2o", "kvzap", "kvzap_no_sink")
                                     for t in {"h2o": ["0.002", "0.005", "0.01"]}.get(m, ["-0.05", "0", "0.05"])]  # fmt: skip
    assert list(zip(table.method, table.threshold, strict=True)) == expected
    assert (table.n_docs == 10).all() and (table.n_tokens == table.n_tokens.iloc[0]).all()
    compressed = table[table.method != "baseline"]
    assert (compressed.kv_density < 1).all() and (compressed.kv_density > 0).all()
    for method, rows in compressed.groupby("method"):
        densities = rows.assign(t=rows.threshold.astype(float)).sort_values("t").kv_density.tolist()
        assert densities == sorted(densities, reverse=True), f"{method}: density should fall as the threshold rises"
    assert "| baseline" in (results / "perplexity" / "summary.md").read_text()
    figures = [results / "perplexity" / "figures" / f"quality_vs_density.{ext}" for ext in ("png", "pdf")]
    figures += [
        results / "figures" / f"eviction_map_{m}.{ext}"
        for m in ("h2o", "kvzap", "kvzap_no_sink")
        for ext in ("png", "pdf")
    ]
    for figure in figures:
        assert figure.stat().st_size > 5000, figure
    assert "skipped 2 shorter than 64 tokens" in (results / "logs" / "prepare.log").read_text()


def test_demo_runs_the_summarization_task(demo_run):
    workdir, _ = demo_run
    results = workdir / "results" / "demo" / "summarization"
    table = pd.read_csv(results / "summary.csv", dtype={"threshold": str}, keep_default_na=False)
    assert len(table) == 10 and (table.n_docs == 10).all()
    baseline = table[table.method == "baseline"].iloc[0]
    assert baseline.delta_rougeL == 0 and 0 < baseline.rougeL <= 100
    assert (table[table.method != "baseline"].kv_density < 1).all()
    assert (results / "figures" / "quality_vs_density.png").stat().st_size > 5000
    outputs = [json.loads(line) for line in (results / "baseline" / "none" / "shard000.jsonl").read_text().splitlines()]
    assert len(outputs) == 5 and all(o["generated"] and o["references"] and o["n_generated"] > 0 for o in outputs)


def test_nothing_to_do_after_a_finished_run(demo_run):
    workdir, config = demo_run
    assert planned_jobs(workdir, write_config(workdir, config, "same.yaml")) == []


def test_adding_a_threshold_plans_only_that_threshold(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["methods"]["h2o"]["thresholds"] = [0.001, *config["methods"]["h2o"]["thresholds"]]
    jobs = planned_jobs(workdir, write_config(workdir, edited, "added.yaml"))
    evaluations = sorted((w["method"], w["threshold"], w["shard"]) for rule, w in jobs if rule == "evaluate")
    assert evaluations == [("h2o", "0.001", s) for s in ("000", "000", "001", "001")]
    assert sorted(w["task"] for rule, w in jobs if rule == "evaluate") == ["perplexity"] * 2 + ["summarization"] * 2
    others = sorted((rule, w.get("task")) for rule, w in jobs if rule != "evaluate")
    assert others == [(rule, task) for rule in ("compare", "score") for task in ("perplexity", "summarization")]


def test_respelling_thresholds_plans_nothing(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["methods"]["kvzap"]["thresholds"] = ["-5.0e-2", 0.0, "0.050"]
    edited["methods"]["h2o"]["thresholds"] = ["2e-3", "5.0e-3", 0.010]
    assert planned_jobs(workdir, write_config(workdir, edited, "respelled.yaml")) == []


def test_changing_one_methods_window_reruns_only_that_method(demo_run):
    workdir, config = demo_run
    edited = copy.deepcopy(config)
    edited["methods"]["kvzap"]["sliding_window"] = 24
    jobs = planned_jobs(workdir, write_config(workdir, edited, "window.yaml"))
    evaluations = sorted((w["task"], w["method"], w["threshold"], w["shard"]) for rule, w in jobs if rule == "evaluate")
    assert evaluations == [
        (task, "kvzap", t, s)
        for task in ("perplexity", "summarization")
        for t in ("-0.05", "0", "0.05")
        for s in ("000", "001")
    ]
    others = sorted((rule, w.get("method") or w.get("task")) for rule, w in jobs if rule != "evaluate")
    assert others == [("compare", "perplexity"), ("compare", "summarization"), ("eviction_map", "kvzap"),
                      ("score", "perplexity"), ("score", "summarization")]  # fmt: skip


def test_speed_settings_rerun_nothing(demo_run):
    """batch_size and cuda_graphs change speed, never results: editing them plans no job."""
    workdir, config = demo_run
    edited = {**copy.deepcopy(config), "batch_size": 1, "cuda_graphs": not config.get("cuda_graphs", True)}
    assert planned_jobs(workdir, write_config(workdir, edited, "speed.yaml")) == []


def test_dry_run_of_the_shipped_study_needs_no_gpu_or_network(tmp_path):
    env_without_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    os.environ.update(env_without_gpu)
    jobs = planned_jobs(tmp_path, ROOT / "config.yaml")
    counts = pd.Series([rule for rule, _ in jobs]).value_counts().to_dict()
    # 10 shards x (baseline + 3 methods x 8 thresholds), one figure per compressed method.
    assert counts == {"evaluate": 250, "eviction_map": 3, "prepare": 1, "score": 1, "compare": 1}
    thresholds = {w["threshold"] for rule, w in jobs if rule == "evaluate" and w["method"] == "h2o"}
    assert thresholds == {"1e-05", "3e-05", "0.0001", "0.0003", "0.0005", "0.001", "0.003", "0.01"}


def test_cuda_graphs_off_reaches_every_job_that_runs_the_model(tmp_path):
    config = load_yaml(ROOT / "config.yaml")
    default = snakemake(tmp_path, write_config(tmp_path, config), "--dry-run", "--printshellcmds").stdout
    config["cuda_graphs"] = False
    off = snakemake(tmp_path, write_config(tmp_path, config, "off.yaml"), "--dry-run", "--printshellcmds").stdout
    # 250 evaluations and 3 eviction maps.
    assert default.count("--cuda-graphs=auto") == 253 and "--cuda-graphs=off" not in default
    assert off.count("--cuda-graphs=off") == 253 and "--cuda-graphs=auto" not in off
    assert default.count("--batch-size=8") == 250


def test_invalid_config_stops_before_any_job_with_one_message(tmp_path):
    config = load_yaml(ROOT / "demo" / "config.yaml")
    config["methods"]["h2o"]["thresholds"] = [0.1, "ten"]
    result = snakemake(tmp_path, write_config(tmp_path, config), "--dry-run", check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "invalid config: methods.h2o.thresholds[1]: threshold 'ten' is not a number (write e.g. -5, 0.0005, 5.0e-4 or -inf)"
    )
    assert "Traceback" not in result.stderr
