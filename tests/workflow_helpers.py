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


def snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(configfile), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def planned_jobs(workdir: Path, configfile: Path) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a dry run plans, `all` left out."""
    out = snakemake(workdir, configfile, "--dry-run").stdout
    jobs, rule = [], None
    for line in out.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):$", line)
        if match:
            rule = match.group(1)
            if rule != "all":
                jobs.append((rule, {}))
            continue
        match = re.match(r"^\s+wildcards: (.*)$", line)
        if match and rule != "all":
            jobs[-1] = (rule, dict(item.split("=", 1) for item in match.group(1).split(", ")))
    return jobs
