"""The tasks a study may measure, declared once: what their shards and result lines hold, their
settings (a `<task>:` block in config.yaml, flags of `kvsweep evaluate`), and how their summary
tables and figures name their quality. What each task does (prepares, runs, scores) is in
`kvsweep.tasks`; nothing here imports torch, so the workflow plans with it.

Adding a task: docs/contributing.md.
"""

from dataclasses import dataclass, replace

from kvsweep.core.errors import KvsweepError
from kvsweep.core.settings import Setting

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
    summary_columns: tuple[str, ...]
    settings: tuple[Setting, ...] = ()
    # Whether prepare reads the dataset's summary field.
    reads_summary_field: bool = False
    # How the input meets the cache: "streaming" (chunks, eviction as they stream) or "kvpress"
    # (kvpress's protocol: the context prefilled whole and compressed once; docs/methods.md).
    protocol: str = "streaming"

    def settings_schema(self) -> dict:
        """The JSON schema of the task's `<name>:` block in config.yaml."""
        properties = {s.name: {**s.schema(), "default": s.default} for s in self.settings}
        return {"type": "object", "additionalProperties": False, "default": {}, "properties": properties}


PERPLEXITY = Task(
    name="perplexity",
    description="next-token NLL of the report streamed through the evicting cache",
    shard_fields=("id", "input_ids"),
    result_fields=frozenset({"id", "n_tokens", "nll_sum", "n_predicted"}) | KV_FIELDS,
    length_field="n_tokens",
    difference="delta_nll",
    difference_label="ΔNLL vs baseline (nats/token)",
    quality="ppl",
    quality_label="perplexity",
    loss_unit="nats per token",
    summary_columns=("method", "swept", "value", "target_density", "ppl", "nll", "delta_nll", "delta_nll_ci_low",
                     "delta_nll_ci_high", "kv_density", "kv_density_compressible", "kv_memory_GiB",
                     "kv_memory_vs_baseline", "n_docs", "n_tokens"),
)  # fmt: skip

SUMMARIZATION = Task(
    name="summarization",
    description="the LongBench GovReport prompt streamed into the evicting cache, then greedy generation; ROUGE",
    shard_fields=("id", "input_ids", "references"),
    result_fields=frozenset({"id", "generated", "references", "n_generated", "n_prompt_tokens"}) | KV_FIELDS,
    length_field="n_prompt_tokens",
    difference="delta_rougeL",
    difference_label="ΔROUGE-L vs baseline (points)",
    quality="rougeL",
    quality_label="ROUGE-L F1 (LongBench, x100)",
    loss_unit="ROUGE-L points",
    summary_columns=("method", "swept", "value", "target_density", "rougeL", "rouge1", "rouge2", "rougeLsum",
                     "delta_rougeL", "delta_rougeL_ci_low", "delta_rougeL_ci_high", "kv_density",
                     "kv_density_compressible", "kv_memory_GiB", "kv_memory_vs_baseline", "decode_tok_s",
                     "decode_vs_baseline", "n_docs", "mean_generated_tokens"),
    settings=(Setting("max_new_tokens", 512, "tokens generated at most per summary", minimum=1),),
    reads_summary_field=True,
)  # fmt: skip

# kvpress's protocol (`kvsweep.engine.compress_once`): the numbers kvpress's pipeline and the
# papers measured with it report, beside the streaming ones.
# Each is its streaming twin with another name, protocol, description and settings (and the
# shard fields kvpress's split records).
PERPLEXITY_KVPRESS = replace(
    PERPLEXITY,
    name="perplexity_kvpress",
    description=(
        "kvpress's protocol: the report but its last continuation_tokens prefilled whole and compressed once, "
        "then the NLL of those last tokens"
    ),
    quality_label="perplexity of the continuation",
    settings=(Setting("continuation_tokens", 128, "the report's last tokens, scored after the rest is compressed",
                      minimum=1),),
    protocol="kvpress",
)  # fmt: skip
SUMMARIZATION_KVPRESS = replace(
    SUMMARIZATION,
    name="summarization_kvpress",
    description=(
        "kvpress's protocol: the GovReport prompt's context (instructions and report) prefilled whole and "
        "compressed once, then its question and greedy generation; ROUGE"
    ),
    shard_fields=("id", "input_ids", "context_length", "context", "question", "references"),
    settings=(
        SUMMARIZATION.settings[0],
        Setting("decoding", False, "keep evicting after the context, while decoding (DMSPress(decoding=True))",
                kind=bool, minimum=None),
    ),
    protocol="kvpress",
)  # fmt: skip

TASKS = {task.name: task for task in (PERPLEXITY, SUMMARIZATION, PERPLEXITY_KVPRESS, SUMMARIZATION_KVPRESS)}


def all_tasks() -> dict[str, Task]:
    return TASKS


def kvpress_protocol_tasks() -> list[str]:
    """The tasks in kvpress's protocol, where compression ratios are evaluated (unless the task keeps
    evicting while it decodes: `kvsweep.study.config.ratio_tasks`)."""
    return [name for name, task in TASKS.items() if task.protocol == "kvpress"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KvsweepError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def task_settings() -> dict[str, Setting]:
    """Every setting of any task, once (the evaluate flags)."""
    return {s.name: s for task in TASKS.values() for s in task.settings}
