"""The workflow on a real SLURM: `snakemake --profile slurm` through sbatch, and the profile's plan.

The cluster test needs a running single-node SLURM (`tests/slurm/start-slurm`, as root; .ci/run
starts it and sets KVSWEEP_REQUIRE_SLURM=1 so that a missing cluster fails instead of skipping).
"""

import copy
import os
import re
import shutil
import subprocess
import time

import pandas as pd
import pytest
import yaml

from workflow_helpers import ROOT, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow

# The test cluster has no accounting database (squeue for job status) and two CPUs.
TEST_CLUSTER = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                "--set-resources", "evaluate:cpus_per_task=1", "eviction_map:cpus_per_task=1"]  # fmt: skip


def slurm_is_running() -> bool:
    if not shutil.which("sinfo"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False)
    return result.returncode == 0 and any(state in result.stdout for state in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def cluster():
    if not slurm_is_running():
        message = "no running SLURM: start one with tests/slurm/start-slurm (as root)"
        if os.environ.get("KVSWEEP_REQUIRE_SLURM"):
            pytest.fail(message)
        pytest.skip(message)


def test_profile_plans_gpu_jobs_for_the_real_study(tmp_path):
    """`snakemake -n --profile slurm` on config.yaml: evaluation jobs carry the GPU, memory and time."""
    jobs = planned_jobs(tmp_path, ROOT / "config.yaml", "--profile", "slurm", resources=True)
    evaluations = [res for rule, _, res in jobs if rule == "evaluate"]
    assert len(evaluations) == 6  # one shard of 100 documents x (baseline + 2 + 2 + 1)
    for res in evaluations:
        assert (res["gpu"], res["mem_mb"], res["runtime"], res["cpus_per_task"]) == ("1", "64000", "240", "4")
        assert res["nodes"] == "1"  # the plugin's --nodes=1: a job's GPUs on one node
    prepare = next(res for rule, _, res in jobs if rule == "prepare")
    assert "gpu" not in prepare and "nodes" not in prepare and prepare["cpus_per_task"] == "1"


def test_a_split_model_asks_for_its_gpus_on_one_node(tmp_path):
    """gpus_per_job: 4 (a 70B model): every GPU job asks for 4 GPUs on one node."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    configfile = write_config(tmp_path, {**config, "gpus_per_job": 4})
    jobs = planned_jobs(tmp_path, configfile, "--profile", "slurm", resources=True)
    gpu_jobs = {rule for rule, _, res in jobs if "gpu" in res}
    assert {"evaluate", "calibrate", "calibration_probe", "eviction_map"} <= gpu_jobs
    assert all((res["gpu"], res["nodes"]) == ("4", "1") for _, _, res in jobs if "gpu" in res)


@pytest.mark.slurm
def test_demo_through_slurm_matches_a_local_run(cluster, demo_run, tmp_path):
    """The demo with one threshold per method through `--profile slurm`: the model jobs go through
    sbatch, and their rows of the summary equal the same rows of a local run."""
    local_dir, config = demo_run
    config = copy.deepcopy(config)
    config["tasks"] = ["perplexity"]
    # One explicit threshold per method, no calibration; methods at compression ratios only (kvpress's
    # protocol, not run here) are left out.
    config["methods"] = {
        name: settings and {**settings, "thresholds": settings["thresholds"][:1]}
        for name, settings in config["methods"].items()
        if not settings or "thresholds" in settings
    }
    for settings in filter(None, config["methods"].values()):
        settings.pop("target_densities", None)
        settings.pop("compression_ratios", None)
    start = time.time()
    result = snakemake(tmp_path, write_config(tmp_path, config), "--profile", "slurm", *TEST_CLUSTER, timeout=1500)
    print(f"SLURM demo wall time: {time.time() - start:.0f} s")

    # Every evaluation job went through sbatch: one plugin log per SLURM job id, apart from the rules' logs.
    evaluation_logs = sorted((tmp_path / "logs" / "slurm" / "rule_evaluate").rglob("*.log"))
    job_ids = {log.stem for log in evaluation_logs}
    assert len(job_ids) == 3, evaluation_logs  # 1 shard x (baseline + 2 methods x 1 threshold)
    submitted = set(re.findall(r"submitted with SLURM jobid (\d+)", result.stdout + result.stderr))
    # and one eviction map per method, and the KVzap surrogate's training
    assert job_ids <= submitted and len(submitted) == 3 + 2 + 1
    assert all("Finished jobid" in log.read_text() for log in evaluation_logs)

    summary = "results/demo/perplexity/summary.csv"
    on_slurm = pd.read_csv(tmp_path / summary, keep_default_na=False, dtype={"value": str})
    local = pd.read_csv(local_dir / summary, keep_default_na=False, dtype={"value": str})
    local = local.merge(on_slurm[["method", "value"]], on=["method", "value"])
    assert len(local) == len(on_slurm) == 3
    # Same numbers up to float summation order (jobs may use other thread counts).
    pd.testing.assert_frame_equal(on_slurm, local, rtol=1e-6)
    assert (tmp_path / "results/demo/perplexity/figures/quality_vs_density.png").stat().st_size > 5000
