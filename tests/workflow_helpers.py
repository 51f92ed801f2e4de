"""Running the Snakemake workflow from tests, in a scratch working directory."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def load_yaml(path):
    return yaml.safe_load(Path(path).read_text())


def write_config(workdir: Path, config: dict, name: str = "study.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(
    workdir: Path, configfile: Path, *args: str, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run Snakemake from the repository root (where `--profile slurm` is found) on `workdir`."""
    command = [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(configfile), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def planned_jobs(workdir: Path, configfile: Path, *args: str, resources: bool = False) -> list[tuple]:
    """(rule, wildcards) of every job a dry run plans, `all` left out; with `resources`, (rule,
    wildcards, resources) where resources maps each resource to its text."""
    out = snakemake(workdir, configfile, "--dry-run", *args).stdout
    if resources:
        return _with_resources(out)
    jobs, rule = [], None
    for line in out.splitlines():
        match = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line)
        if match:
            rule = match.group(1)
            if rule != "all":
                jobs.append((rule, {}))
            continue
        match = re.match(r"^\s+wildcards: (.*)$", line)
        if match and rule != "all":
            jobs[-1] = (rule, dict(item.split("=", 1) for item in match.group(1).split(", ")))
    return jobs


def _with_resources(out: str) -> list[tuple[str, dict, dict]]:
    jobs = []
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:\n)", out):
        match = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):\n", block)
        if not match or match.group(1) == "all":
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        found = re.search(r"^\s+resources: (.*)$", block, re.M)
        jobs.append((
            match.group(1),
            dict(item.split("=", 1) for item in wildcards.group(1).split(", ")) if wildcards else {},
            dict(item.split("=", 1) for item in found.group(1).split(", ")) if found else {},
        ))  # fmt: skip
    return jobs
