"""What each task does with its documents (its declaration is `kvsweep.study.tasks`): how
`prepare` turns a source record into a shard line, how `evaluate` runs a batch, how `score`
summarizes a configuration against the baseline, and how `comparison` measures one document's
quality loss.

Adding a task: docs/contributing.md.
"""

from collections.abc import Callable
from dataclasses import dataclass

from kvsweep.study.tasks import Task, get_task


@dataclass(frozen=True)
class Preparation:
    """What prepare tells a task of the source it reads."""

    source: str
    max_length: int
    summary_field: str


@dataclass(frozen=True)
class Evaluation:
    """What evaluate tells a task of the run: the model's name (for its tokenizer), the chunk, CUDA
    graphs (None: on a GPU), the task's own settings (its `<task>:` block), and in kvpress's
    protocol the contexts prefilled at a time (None: the whole batch; speed and memory only)."""

    model_name: str
    chunk_size: int
    cuda_graphs: bool | None
    settings: dict
    prefill_batch: int | None = None


@dataclass(frozen=True)
class TaskWork:
    task: Task
    # prepare: (doc, record, text, tokenizer, preparation, stats, index) adds the task's fields to doc;
    # shard_line(doc) is its line in the task's shard; report(stats, preparation) says what prepare did.
    prepare_document: Callable
    shard_line: Callable
    # evaluate: check_document(doc, max_length, path) refuses an input the task cannot use as is;
    # evaluator(evaluation, model, press, clock) -> a function from a batch of shard lines to result
    # lines (`clock`, a kvsweep.core.timing.StageClock or None, goes to stream_nll / stream_generate).
    check_document: Callable
    evaluator: Callable
    # score: summarize(results, n_resamples, confidence, seed) -> one row per configuration.
    summarize: Callable
    # comparison: document_losses(rows, base) -> (loss, weight) per document row.
    document_losses: Callable
    report: Callable = lambda stats, preparation: None


def with_costs(lines: list[dict], stats: dict) -> list[dict]:
    """A batch's result lines with what its documents cost: each document's share of the batch's KV
    cache (`kv_cache_bytes`: the cache's bytes over the batch's documents) and, for generation, the
    batch's decoding speed (`decode_tok_s`: the tokens its decoding steps after the first wrote, per
    second; None where they wrote none). `stats` is the engine's (its `stats` argument)."""
    costs = {"kv_cache_bytes": stats["kv_cache_bytes"] / len(lines)}
    if "decode_seconds" in stats:  # None where no step after the first wrote a token
        measured = stats["decode_seconds"] > 0 and stats["decode_tokens"] > 0
        costs["decode_tok_s"] = stats["decode_tokens"] / stats["decode_seconds"] if measured else None
    return [{**line, **costs} for line in lines]


def work_of(name: str) -> TaskWork:
    from kvsweep.tasks.registry import WORK

    return WORK[get_task(name).name]
