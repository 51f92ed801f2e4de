# Helpers shared by the rules: config validation (before any job), paths, and per-job parameters.
import math
import sys
from pathlib import Path


SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
# Every job (local, on SLURM, or in a conda env) imports kvsweep from this checkout. Without conda,
# `python` in a job is the interpreter running Snakemake, so a virtual environment need not be
# activated; with `--sdm conda` it is the rule's environment.
_job_path = "" if "conda" in str(workflow.deployment_settings.deployment_method).lower() else f"export PATH={Path(sys.executable).parent}:$PATH; "
# (Snakemake formats the prefix too: doubled braces reach the shell as single ones.)
shell.prefix(_job_path + f"export PYTHONPATH={SRC}" + "${{PYTHONPATH:+:$PYTHONPATH}}; ")

from kvsweep.config import method_settings, validate_config  # noqa: E402
from kvsweep.errors import KvsweepError  # noqa: E402
from kvsweep.methods import get_method  # noqa: E402
from kvsweep.prepare import n_shards  # noqa: E402

try:
    validate_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
except KvsweepError as err:
    # One line on stderr and a non-zero exit, before any job is planned.
    print(f"invalid config: {err}", file=sys.stderr)
    raise SystemExit(1)

RESULTS = f"results/{config['run']}"
DEMO_ASSETS = f"{RESULTS}/demo_assets"
SHARDS = [f"{i:03d}" for i in range(n_shards(config["dataset"]["max_documents"], config["dataset"]["shard_size"]))]
METHODS = list(config["methods"])
COMPRESSED = [m for m in METHODS if get_method(m).takes_threshold]

# A threshold in a path is always written in its canonical form; baseline's is "none".
wildcard_constraints:
    task="perplexity|summarization",
    method="|".join(METHODS),
    threshold=r"none|-?inf|-?[0-9][0-9.e+-]*",
    shard=r"\d{3}",


def local_input(path):
    """A model, surrogate or data file named by a local path is an input (so edits rerun jobs, and
    the demo rule makes it); a hub id is not."""
    if path and (Path(path).exists() or str(path).startswith(DEMO_ASSETS)):
        return [path]
    return []


def thresholds(method):
    return config["methods"][method]["canonical_thresholds"] if get_method(method).takes_threshold else ["none"]


def configurations():
    """Every (method, threshold) of the study, baseline once."""
    return [(m, t) for m in METHODS for t in thresholds(m)]


def evaluation_outputs(task):
    return [f"{RESULTS}/{task}/{m}/{t}/shard{s}.jsonl" for m, t in configurations() for s in SHARDS]


def middle_threshold(method):
    values = sorted(thresholds(method), key=float)
    return values[len(values) // 2]


def final_outputs():
    outputs = []
    for task in config["tasks"]:
        outputs += [f"{RESULTS}/{task}/summary.csv", f"{RESULTS}/{task}/summary.md"]
        outputs += expand(f"{RESULTS}/{task}/figures/quality_vs_density.{{ext}}", ext=["png", "pdf"])
    outputs += expand(f"{RESULTS}/figures/eviction_map_{{method}}.{{ext}}", method=COMPRESSED, ext=["png", "pdf"])
    return outputs


def method_arguments(method, threshold):
    """Command-line arguments for one method's job: its threshold and only its own settings."""
    args = [] if threshold == "none" else [f"--threshold={threshold}"]
    for key, value in method_settings(config, method).items():
        if value is not None:
            args.append(f"--{key.replace('_', '-')}={value}")
    return " ".join(args)


def task_arguments(task):
    if task == "summarization":
        return f"--task=summarization --max-new-tokens={config['summarization']['max_new_tokens']}"
    return "--task=perplexity"


def engine_arguments():
    """The arguments of every job that runs the model and that its results depend on."""
    return (
        f"--model={config['model']['name']} --dtype={config['model']['dtype']} --device={config['device']} "
        f"--chunk-size={config['chunk_size']} --max-length={config['dataset']['max_length']}"
    )


def gpu_resources():
    return {"gpu": config["gpus_per_job"]} if config["gpus_per_job"] > 0 else {}


def speed_resources():
    """Settings that change speed and memory, never results. As resources rather than params,
    changing them reruns nothing, and `--set-resources evaluate:batch_size=16` overrides one rule."""
    return {"batch_size": config["batch_size"], "cuda_graphs": "auto" if config["cuda_graphs"] else "off"}
