"""The registry of tasks: what a study measures on its documents.

A task module declares, in one `Task`, everything the rest of kvsweep asks of it: the fields of
its shards and result lines, its settings (a `<task>:` block in config.yaml and flags of
`kvsweep.evaluate`), how `prepare` turns a source record into a shard line, how `evaluate` runs a
batch, how `score` summarizes a configuration against the baseline, and how `comparison` measures
one document's quality loss. Nothing here imports torch: the workflow reads the registry while
planning; a task's functions import what they need when a job calls them.

Adding a task is one file in this folder defining a `Task`, and one entry in `registry.py`.
"""

from collections.abc import Callable
from dataclasses import dataclass

from kvsweep.errors import KvsweepError
from kvsweep.methods import Setting

# The KV counts every result line holds, whatever its task (`StreamingThresholdPress.kv_counts`).
KV_FIELDS = frozenset({"kv_kept", "kv_total", "kv_kept_compressible", "kv_total_compressible"})


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    # A shard line's fields, and a result line's.
    shard_fields: tuple[str, ...]
    result_fields: frozenset[str]
    # The input's length in a result line: two results of different lengths read different inputs.
    length_field: str
    # Summary columns: the paired difference to the baseline (with _ci_low/_ci_high) and the
    # quality itself, with their axis labels; the unit of a document's quality loss.
    difference: str
    difference_label: str
    quality: str
    quality_label: str
    loss_unit: str
    # prepare: (doc, record, text, tokenizer, args, stats, index) adds the task's fields to doc;
    # shard_line(doc) is its line in the task's shard; report(stats, args) says what prepare did.
    prepare_document: Callable
    shard_line: Callable
    # evaluate: check_document(doc, max_length, path) refuses an input the task cannot use as is;
    # evaluator(args, model, press, clock) -> a function from a batch of shard lines to result lines
    # (`clock`, a kvsweep.stages.StageClock or None, goes to stream_nll / stream_generate).
    check_document: Callable
    evaluator: Callable
    # score: summarize(results, n_resamples, confidence, seed) -> one row per configuration.
    summarize: Callable
    # comparison: document_losses(rows, base) -> (loss, weight) per document row.
    document_losses: Callable
    summary_columns: tuple[str, ...]
    settings: tuple[Setting, ...] = ()
    # Whether prepare reads the dataset's summary field.
    reads_summary_field: bool = False
    report: Callable = lambda stats, args: None

    def settings_schema(self) -> dict:
        """The JSON schema of the task's `<name>:` block in config.yaml."""
        properties = {s.name: {**s.schema(), "default": s.default} for s in self.settings}
        return {"type": "object", "additionalProperties": False, "default": {}, "properties": properties}


def all_tasks() -> dict[str, Task]:
    from kvsweep.tasks.registry import TASKS

    return TASKS


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise KvsweepError(f"unknown task '{name}'; known tasks: {', '.join(tasks)}")
    return tasks[name]


def task_settings() -> dict[str, Setting]:
    """Every setting of any task, once (the evaluate flags)."""
    return {s.name: s for task in all_tasks().values() for s in task.settings}
