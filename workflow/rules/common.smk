# Helpers shared by the rules: config validation (before any job), paths, and per-job arguments.
#
# No config value ever reaches a shell unquoted: every rule passes its arguments as a list of
# `--key=value` strings in params and writes `{params.args:q}`, which quotes each element.
import os
import sys
from pathlib import Path
from shlex import quote


SRC = str(Path(workflow.basedir) / "src")  # on sys.path already (config_files.smk)


def _shell_text(text):
    """`text` quoted for the shell, with braces doubled (Snakemake formats the prefix too)."""
    return quote(text).replace("{", "{{").replace("}", "}}")


# Every job (local, on SLURM, or in a conda env) imports kvsweep from this checkout. Without conda,
# `python` in a job is the interpreter running Snakemake, so a virtual environment need not be
# activated; with `--sdm conda` it is the rule's environment.
_uses_conda = "conda" in str(workflow.deployment_settings.deployment_method).lower()
_job_path = "" if _uses_conda else f"export PATH={_shell_text(str(Path(sys.executable).parent))}:$PATH; "
# A job's Python process ends with the rule's shell (kvsweep.core.job.die_with_parent).
shell.prefix(_job_path + f"export PYTHONPATH={_shell_text(SRC)}" + "${{PYTHONPATH:+:$PYTHONPATH}} KVSWEEP_DIE_WITH_PARENT=1; ")

# The workflow imports kvsweep's `core` and `study` only (no torch: a login node plans the study).
from kvsweep.core.compatibility import check_kernels_package  # noqa: E402
from kvsweep.core.errors import KvsweepError  # noqa: E402
from kvsweep.core.io import read_jsonl, record_digests  # noqa: E402
from kvsweep.core.job import GPUS_VARIABLE  # noqa: E402
from kvsweep.core.paths import incomplete_local_folder, missing_local_path  # noqa: E402
from kvsweep.core.thresholds import RATIO_PREFIX, canonical_threshold, ratio_folder, ratio_of_folder  # noqa: E402
from kvsweep.study.calibrations import read_calibrations  # noqa: E402
from kvsweep.study.config import (  # noqa: E402
    TRAIN,
    adaptive_safeguard,
    method_of,
    method_settings,
    ratio_tasks,
    surrogate_to_train,
    tasks_without_ratios,
    trained_surrogate_path,
    unused_compression_ratios,
    validate_config,
)
from kvsweep.study.shards import calibration_offset, documents_per_shard, n_shards, surrogate_offset  # noqa: E402
from kvsweep.study.tasks import all_tasks, get_task, kvpress_protocol_tasks  # noqa: E402


def _stop(message, what="invalid config"):
    """One line on stderr and a non-zero exit, before any job is planned."""
    print(f"{what}: {message}", file=sys.stderr)
    raise SystemExit(1)


try:
    validate_config(config)
except KvsweepError as err:
    _stop(err)
try:  # every job would fail at its first import of transformers
    check_kernels_package()
except KvsweepError as err:
    _stop(err, "unusable environment")

# Every job splits its model over gpus_per_job GPUs. The count reaches the jobs in the environment
# (under SLURM too: each job runs this file again), not on their command lines, which Snakemake
# compares: changing it reruns nothing, as it changes no result.
os.environ[GPUS_VARIABLE] = str(config["gpus_per_job"])

RESULTS = f"results/{config['run']}"
# The schema's pattern for `run` keeps it a plain folder name; this states the guarantee itself.
if Path(RESULTS).resolve().parent != Path("results").resolve():
    _stop(f"run: '{config['run']}' would put outputs outside results/")
DEMO_ASSETS = f"{RESULTS}/demo_assets"
SHARD_SIZE = documents_per_shard(config)  # documents per evaluation job
SHARDS = [f"{i:03d}" for i in range(n_shards(config["dataset"]["max_documents"], SHARD_SIZE))]
# Entries of `methods:` (a path's {method}); each runs the method its `type` names.
METHODS = list(config["methods"])
COMPRESSED = [m for m in METHODS if method_of(config, m).sweep is not None]
USES_SURROGATE = any("kvzap_surrogate" in method_of(config, m).defaults for m in METHODS)
# A KVzap surrogate the workflow trains first (model.kvzap_surrogate: train).
SURROGATE_TO_TRAIN = surrogate_to_train(config) if USES_SURROGATE else None
SURROGATE_DATA = f"{RESULTS}/kvzap_surrogate/data"
# The surrogate this study trained, whether still `train` or now named by its path (its job's
# costs stay in job_costs either way, and switching reruns nothing).
_TRAINED_HERE = trained_surrogate_path(config)
_NAMED = str(config["model"]["kvzap_surrogate"] or "")
TRAINED_SURROGATE = _TRAINED_HERE if USES_SURROGATE and (SURROGATE_TO_TRAIN or Path(_NAMED) == Path(_TRAINED_HERE)) else None
if SURROGATE_TO_TRAIN and not Path(SURROGATE_TO_TRAIN).exists() and workflow.is_main_process:
    print(f"kvsweep: the KVzap surrogate is trained first, into {SURROGATE_TO_TRAIN}", file=sys.stderr)

# A local model, surrogate or data file that does not exist is found now, not by 250 failed jobs
# (unless the workflow makes it: the demo's assets).
for _key, _value, _used, _kinds in (
    ("model.name", config["model"]["name"], True, ("model", "tokenizer")),
    ("model.kvzap_surrogate", config["model"]["kvzap_surrogate"], USES_SURROGATE, ("surrogate",)),
    ("dataset.source", config["dataset"]["source"], True, ()),
):
    if _used and _value and not str(_value).startswith(DEMO_ASSETS) and _value != TRAIN:
        if (_missing := missing_local_path(_key, str(_value))) is not None:
            _hint = " (to train a surrogate for this model: kvzap_surrogate: train)" if _key == "model.kvzap_surrogate" else ""
            _stop(f"{_missing}{_hint}")
        for _kind in _kinds:
            if (_incomplete := incomplete_local_folder(_kind, str(_value))) is not None:
                _stop(f"{_key}: {_incomplete}")
        if _key == "dataset.source" and Path(_value).is_file() and not str(_value).endswith(".jsonl"):
            _stop(f"dataset.source: '{_value}' is a local file but not a .jsonl file")


# The swept value in a path (a threshold, the window of streaming_llm, or ratio_<r>: a compression
# ratio) and a target density are always written in their canonical form; baseline's value is "none".
wildcard_constraints:
    task="|".join(all_tasks()),
    method="|".join(METHODS),
    value=r"none|-?inf|-?[0-9][0-9.e+-]*|ratio_[0-9][0-9.e-]*",
    target=r"[0-9][0-9.e-]*",
    shard=r"\d{3}",


_unused = unused_compression_ratios(config)
if _unused and workflow.is_main_process:
    print(
        f"kvsweep: the compression_ratios of {', '.join(_unused)} are not evaluated: they are kvpress's budgets, "
        f"for the tasks in kvpress's protocol ({', '.join(kvpress_protocol_tasks())}) that compress the context "
        "once (decoding: false), and tasks lists none.",
        file=sys.stderr,
    )
for _task in tasks_without_ratios(config) if workflow.is_main_process else []:
    print(
        f"kvsweep: {_task} evaluates no compression ratio: {_task}.decoding is true (eviction goes on while it "
        "writes), and a compression ratio compresses the context once.",
        file=sys.stderr,
    )


# Target densities: a calibration job per (method, target) finds the threshold first (a checkpoint:
# the evaluation jobs at the thresholds found are planned once it has run).
CALIBRATIONS = [(m, t) for m in COMPRESSED for t in config["methods"][m]["canonical_targets"]]
CALIBRATION_DATA = f"{RESULTS}/calibration/data/perplexity"
_pending = [(m, t) for m, t in CALIBRATIONS if not Path(f"{RESULTS}/calibration/{m}/{t}.json").exists()]
if _pending and workflow.is_main_process:
    print(
        f"kvsweep: {len(_pending)} calibration job(s) for target densities come first; the evaluation jobs at "
        "the thresholds they find are planned once they have run.",
        file=sys.stderr,
    )


def local_input(path):
    """A model, surrogate or data file named by a local path is an input (so edits rerun jobs, and
    the demo rule or train_surrogate makes it); a hub id is not."""
    made_here = str(path).startswith(DEMO_ASSETS) or path == SURROGATE_TO_TRAIN
    if path and (Path(path).expanduser().exists() or made_here):
        return [path]
    return []


def _source_digests():
    """The local JSONL source's record digests (kvsweep.core.io.record_digests), read once, as far as asked."""
    digests, read = [], record_digests(config["dataset"]["source"])

    def at(index):
        while len(digests) <= index:
            found = next(read, None)
            if found is None:
                return None
            digests.append(found)
        return digests[index]

    return at


_SOURCE_DIGEST_AT = _source_digests()


def source_input(listing, expected):
    """The dataset source, as the input of the prepare job that writes the document list `listing`
    holding `expected` documents. Once that list is whole and the records it read (up to its last
    document) are unchanged, the source is `ancient`: records appended or edited after them rerun
    nothing. Otherwise (no list yet, a source too short to fill it, a record read that changed, a
    list from before the lists held digests) its modification time counts, as for any input."""
    source = local_input(config["dataset"]["source"])
    if not source or not str(source[0]).endswith(".jsonl") or not Path(listing).exists():
        return source
    try:
        entries = read_jsonl(listing)
    except KvsweepError:
        return source
    last = entries[-1] if len(entries) == expected else {}
    unchanged = "source_sha256" in last and _SOURCE_DIGEST_AT(last["index"]) == last["source_sha256"]
    return [ancient(source[0])] if unchanged else source


def surrogate_input(wildcards):
    """The KVzap surrogate, for the methods that read it only: replacing it reruns no other job."""
    settings = method_settings(config, wildcards.method)
    return local_input(settings["kvzap_surrogate"]) if "kvzap_surrogate" in settings else []


def shard_documents(shard):
    """Documents in shard `shard` once the source holds enough: the last shard may hold fewer."""
    return min(SHARD_SIZE, config["dataset"]["max_documents"] - shard * SHARD_SIZE)


def swept_values(method):
    """The explicit values an entry sweeps: thresholds, or windows (baseline: "none")."""
    return config["methods"][method]["canonical_values"] if method in COMPRESSED else ["none"]


def configurations():
    """Every (method, explicit value) of the study, baseline once."""
    return [(m, v) for m in METHODS for v in swept_values(m)]


def ratio_configurations(task):
    """(method, ratio_<r>) for each compression ratio: kvpress's budgets, in kvpress's protocol only."""
    if task not in ratio_tasks(config):
        return []
    return [(m, ratio_folder(r)) for m in COMPRESSED for r in config["methods"][m].get("canonical_ratios", [])]


def evaluation_outputs(task):
    """The evaluations at explicit values (thresholds, windows, compression ratios): known before any job runs."""
    explicit = configurations() + ratio_configurations(task)
    return [f"{RESULTS}/{task}/{m}/{v}/shard{s}.jsonl" for m, v in explicit for s in SHARDS]


def calibration_outputs():
    return [f"{RESULTS}/calibration/{m}/{t}.json" for m, t in CALIBRATIONS]


def calibrated_threshold(method, target):
    """The threshold a finished calibration found (raises, for Snakemake, while it has not run)."""
    path = checkpoints.calibrate.get(method=method, target=target).output[0]
    try:
        threshold = read_calibrations([path])[0]["threshold"]
        if canonical_threshold(threshold) != threshold:
            raise KvsweepError(f"{path}: threshold {threshold!r} is not a threshold kvsweep wrote")
    except KvsweepError as err:
        _stop(f"{err}; delete it to calibrate this target again", "unreadable calibration")
    return threshold


def calibrated_outputs(task):
    """The evaluations at calibrated thresholds (those equal to an explicit one are not repeated)."""
    found = {(m, calibrated_threshold(m, t)) for m, t in CALIBRATIONS} - set(configurations())
    return [f"{RESULTS}/{task}/{m}/{t}/shard{s}.jsonl" for m, t in sorted(found) for s in SHARDS]


def scored_inputs():
    """Evaluations at explicit values (known at once), at calibrated thresholds (known once the
    calibrations have run), the calibrations themselves (which target each threshold met), and the
    document lists the results are checked against."""
    return {
        "explicit": lambda wildcards: evaluation_outputs(wildcards.task),
        "calibrated": lambda wildcards: calibrated_outputs(wildcards.task),
        "calibrations": calibration_outputs(),
        # The prepared shards' document lists: each result shard must hold exactly their documents.
        "documents": lambda wildcards: [f"{RESULTS}/data/{wildcards.task}/shard{s}.documents.jsonl" for s in SHARDS],
    }


def eviction_map_calibration(method):
    """For a method with target densities only: the calibration of its middle target."""
    if swept_values(method):
        return []
    targets = sorted(config["methods"][method]["canonical_targets"], key=float)
    return [f"{RESULTS}/calibration/{method}/{targets[len(targets) // 2]}.json"]


def eviction_map_arguments(method):
    """The method's middle explicit value, or the threshold its middle target's calibration found."""
    if not swept_values(method):
        return options(calibration=eviction_map_calibration(method)[0]) + method_arguments(method, "none")
    values = sorted(swept_values(method), key=float)
    return method_arguments(method, values[len(values) // 2])


def final_outputs():
    # The calibrations are targets of their own: Snakemake does not check the rerun triggers of a
    # job that waits on an unfinished checkpoint, so a new target's calibration would otherwise
    # never be asked for by the (existing) summary that depends on it.
    outputs = [f"{RESULTS}/config.yaml", *calibration_outputs()]
    if SURROGATE_TO_TRAIN:
        outputs += [SURROGATE_TO_TRAIN, f"{RESULTS}/kvzap_surrogate/documents_check.txt"]
    for task in config["tasks"]:
        # The evaluations are targets too: Snakemake reruns no job for an input deleted under an
        # output that exists, so a deleted result would otherwise stay in summary.csv unnoticed.
        outputs += evaluation_outputs(task)
        outputs += [f"{RESULTS}/{task}/summary.csv", f"{RESULTS}/{task}/summary.md", f"{RESULTS}/data/{task}/documents.jsonl"]
        outputs += [f"{RESULTS}/{task}/comparison.csv", f"{RESULTS}/{task}/comparison.md"]
        outputs += expand(f"{RESULTS}/{task}/figures/quality_vs_density.{{ext}}", ext=["png", "pdf"])
        if f"{task}_kvpress" in config["tasks"]:  # the task under both protocols, side by side
            outputs += expand(f"{RESULTS}/protocols/{task}.{{ext}}", ext=["csv", "md", "png", "pdf"])
    # (a method with compression ratios only has no streaming value to map)
    mapped = [m for m in COMPRESSED if swept_values(m) or config["methods"][m]["canonical_targets"]]
    outputs += expand(f"{RESULTS}/figures/eviction_map_{{method}}.{{ext}}", method=mapped, ext=["png", "pdf"])
    return outputs


def calibrated_targets(wildcards):
    """Every evaluation at a calibrated threshold, a target like those at explicit values (known
    once the calibrations have run)."""
    return [path for task in config["tasks"] for path in calibrated_outputs(task)]


def options(**values):
    """`--key=value` arguments, one list element each (quoted one by one by `{params.x:q}`);
    None is left out. Params that hold config text are returned by functions: Snakemake reads
    {name} in a plain params string as a wildcard, and takes a function's result as it is."""
    return [f"--{key.replace('_', '-')}={value}" for key, value in values.items() if value is not None]


def method_arguments(method, value):
    """Arguments of one entry's job: the method it runs, its swept value (a threshold, or the
    setting the method sweeps) and only its own settings."""
    runs = method_of(config, method)
    settings = method_settings(config, method)
    threshold = None
    if ratio_of_folder(value) is not None:
        if not runs.takes_threshold:  # the ratio sizes what an order keeps (StreamingLLM): no window
            settings.pop(runs.sweep, None)
        return options(method=runs.name if runs.name != method else None, compression_ratio=value.removeprefix(RATIO_PREFIX),
                       adaptive_safeguard=adaptive_safeguard(config, method), **settings)  # fmt: skip
    if value != "none" and runs.takes_threshold:
        threshold = value
    elif value != "none":
        settings[runs.sweep] = value
    # The shell passes --method=<entry name>; an entry of another method's type names its method
    # here, after it (the last --method counts). Entries named after their method keep the params
    # of earlier kvsweep versions, so upgrading reruns none of their jobs.
    return options(method=runs.name if runs.name != method else None, threshold=threshold, **settings)


def swept_arguments():
    """METHOD=SETTING for each entry that sweeps a setting rather than a threshold."""
    runs = {m: method_of(config, m) for m in COMPRESSED}
    return [f"{m}={method.sweep}" for m, method in runs.items() if not method.takes_threshold]


def task_arguments(task):
    """The task and its own settings (its block in config.yaml)."""
    return options(task=task, **{s.name: config[task][s.name] for s in get_task(task).settings})


def engine_arguments(task=None):
    """The arguments of every job that runs the model and that its results depend on. A task in
    kvpress's protocol reads its context in one pass whatever `chunk_size` says: its chunk is
    max_length, so that an edit of chunk_size reruns only the streaming jobs."""
    streams = task is None or get_task(task).protocol == "streaming"
    return options(
        model=config["model"]["name"],
        dtype=config["model"]["dtype"],
        device=config["device"],
        chunk_size=config["chunk_size"] if streams else config["dataset"]["max_length"],
        max_length=config["dataset"]["max_length"],
    )


def prepare_arguments(task, shard=None):
    """Only what the task's shard depends on: summarization's reference field is not perplexity's,
    and shard i only on the documents up to its end (a full shard's arguments do not change when
    documents are added). Without `shard`: every shard (the calibration documents)."""
    dataset = config["dataset"]
    end = dataset["max_documents"] if shard is None else min((shard + 1) * SHARD_SIZE, dataset["max_documents"])
    return options(
        source=dataset["source"],
        split=dataset["split"],
        subset=dataset["subset"],
        text_field=dataset["text_field"],
        summary_field=dataset["summary_field"] if get_task(task).reads_summary_field else None,
        id_field=dataset["id_field"],
        tokenizer=config["model"]["name"],
        max_documents=end,
        max_length=dataset["max_length"],
        min_length=dataset["min_length"],
        shard_size=SHARD_SIZE,
        shard=shard,
        tasks=task,
    )


def model_job_resources(speed=True):
    """The resources of a job that runs the model: its memory and time, its GPUs, all on one node
    (the model is split over them: kvsweep.engine.placement), and (with `speed`) the settings that
    change speed and memory, never results. As resources rather than params, changing them reruns
    nothing, and `--set-resources evaluate:batch_size=16` overrides one rule."""
    found = {"mem_mb": config["resources"]["mem_mb"], "runtime": config["resources"]["runtime"]}
    if config["gpus_per_job"] > 0:
        found.update(gpu=config["gpus_per_job"], nodes=1)
    if speed:
        found.update(batch_size=config["batch_size"], cuda_graphs="auto" if config["cuda_graphs"] else "off",
                     prefill_batch_size=config["prefill_batch_size"] or 0)
    return found


def calibration_prepare_arguments():
    """The calibration documents: the next ones after the study's (or after calibration.skip_documents)
    that pass the same filters."""
    n = config["calibration"]["documents"]
    return overridden(prepare_arguments("perplexity"), max_documents=n, shard_size=n,
                      skip_documents=calibration_offset(config))  # fmt: skip


def overridden(arguments, **values):
    """`arguments` (`--key=value` strings) with the keys of `values` replaced, the new ones last."""
    overrides = options(**values)
    keys = {a.split("=", 1)[0] for a in overrides}
    return [a for a in arguments if a.split("=", 1)[0] not in keys] + overrides


def surrogate_prepare_arguments():
    """The surrogate's documents: the next ones after the calibration documents that pass the same
    filters (so never evaluated or calibrated on), cut to surrogate.max_length."""
    surrogate = config["surrogate"]
    n = surrogate["documents"] + surrogate["validation_documents"]
    return overridden(prepare_arguments("perplexity"), max_documents=n, shard_size=n,
                      skip_documents=surrogate_offset(config), max_length=surrogate["max_length"])  # fmt: skip


def surrogate_training_arguments():
    surrogate = config["surrogate"]
    settings = {k: v for k, v in surrogate.items() if k not in ("documents", "max_length")}
    if config["model"]["kvzap_type"] == "linear":  # the MLP's settings do not change a linear fit
        settings = {k: v for k, v in settings.items() if k in ("validation_documents", "tokens_per_document", "seed")}
    return options(model=config["model"]["name"], dtype=config["model"]["dtype"], device=config["device"],
                   kvzap_type=config["model"]["kvzap_type"], **settings)  # fmt: skip


def surrogate_exclusions():
    """The document lists the surrogate's documents are checked against: the study's and the
    calibration's."""
    lists = [f"{RESULTS}/data/{task}/documents.jsonl" for task in config["tasks"]]
    return lists + ([f"{CALIBRATION_DATA}/documents.jsonl"] if CALIBRATIONS else [])


def calibration_search_arguments(target):
    settings = config["calibration"]
    return options(target_density=target, tolerance=settings["tolerance"], max_steps=settings["max_steps"])


def reported_config():
    """The config as the report shows it: defaults filled in, thresholds and targets in their
    canonical spelling, without the settings that change only speed (batch_size, cuda_graphs,
    gpus_per_job, prefill_batch_size). As the params of its rule, it changes (and reruns the rule) exactly when a result
    may change."""
    speed_only = ("batch_size", "cuda_graphs", "gpus_per_job", "prefill_batch_size")
    shown = {key: value for key, value in config.items() if key not in speed_only}
    shown["methods"] = {}
    for name, settings in config["methods"].items():
        sweep_key = method_of(config, name).sweep_key
        settings = {k: v for k, v in settings.items() if k not in (sweep_key, "target_densities", "compression_ratios")}
        # Windows are whole numbers; thresholds and targets are numbers (-inf included).
        runs = method_of(config, name)
        as_number = runs.setting(runs.sweep).kind if runs.sweep_key and not runs.takes_threshold else float
        for key, canonical, kind in (
            (sweep_key, "canonical_values", as_number),
            ("target_densities", "canonical_targets", float),
            ("compression_ratios", "canonical_ratios", float),
        ):
            values = settings.pop(canonical, [])
            if values:
                settings[key] = [kind(value) for value in values]
        shown["methods"][name] = settings
    return shown
