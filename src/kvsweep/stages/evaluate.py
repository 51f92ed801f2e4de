"""Evaluation of one shard under one method and its swept value (a threshold, or streaming_llm's
window): perplexity or summarization, streaming or in kvpress's protocol (the `_kvpress` tasks:
their shards also hold the context's length, and `kvsweep.tasks` says what each task runs).

Perplexity: input lines {"id": str, "input_ids": [int, ...]}; one output line per document, in
input order, with id, n_tokens, nll_sum, n_predicted, kv_kept, kv_total, kv_kept_compressible,
kv_total_compressible. Summarization: input lines also hold "references" (the prompt is in
input_ids); output lines hold id, generated (text), references, n_generated, n_prompt_tokens and the
KV counts at the end of generation. Every line also holds `provenance`: the kvsweep commit, the
torch / transformers / kvpress versions, the device and the dtype it was computed with, and the
fusions and kernels that had run. Finished documents are appended to OUT.jsonl.partial as their
batch completes, so a killed or requeued job resumes where it stopped; OUT.jsonl appears
(atomically) only at the end, with OUT.stages.json beside it: where the job's wall time went
(`kvsweep.core.timing`), also printed at the end of the log.
"""

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import ensure_parent, write_jsonl_atomic
from kvsweep.core.provenance import source_revision, weights_identity
from kvsweep.core.timing import StageClock, discard_stage_record
from kvsweep.stages.model_jobs import (
    EngineOptions,
    build_press,
    check_vocabulary,
    load_engine_model,
    load_shard,
    resolve_method,
)
from kvsweep.study.methods import get_method
from kvsweep.study.methods.kvzap import default_surrogate
from kvsweep.study.tasks import get_task, kvpress_protocol_tasks
from kvsweep.tasks import Evaluation, work_of


@dataclass
class EvaluateOptions(EngineOptions):
    output: str = ""
    task: str = "perplexity"
    task_settings: dict = field(default_factory=dict)  # the task's own settings (summarization: max_new_tokens)
    # kvpress's budget instead of a threshold (kvpress's protocol): the share of the context evicted
    compression_ratio: float | None = None
    adaptive_safeguard: float | None = None  # with it, AdaKV's budget: a layer's heads share the ratio's
    prefill_batch_size: int = 0  # kvpress's protocol: contexts prefilled (and compacted) at a time; 0: the batch


def run(options: EvaluateOptions, clock: StageClock | None = None) -> None:
    clock = clock or StageClock()
    task = get_task(options.task)
    options.task_settings = {
        s.name: s.check(s.flag, options.task_settings.get(s.name, s.default)) for s in task.settings
    }
    if options.compression_ratio is None and options.adaptive_safeguard is None:
        method, settings = resolve_method(options)
    else:
        ratio_options = replace(options, threshold=check_compression_ratio(options, task))
        method, settings = resolve_method(ratio_options, compression_ratio=True)
    output = ensure_parent(options.output)
    discard_stage_record(output)
    documents = load_shard(options.data, options.max_length, options.task)
    if not documents:
        print(f"{options.data}: empty shard, nothing to evaluate", file=sys.stderr)
        write_jsonl_atomic(output, [])
        clock.save(output, documents=0, tokens=0, batch_size=options.batch_size, gpus=options.gpu_count)
        return

    # Heavy imports only once the input is known to be good. The model first: a hub model not yet
    # in the local cache has its identity (for the fingerprint) only once it has been downloaded.
    model = load_engine_model(options, clock)
    from kvsweep.engine.models import environment, vocabulary_size, what_ran

    check_vocabulary(documents, vocabulary_size(model), options.data)
    provenance = {**environment(model, options.dtype), "protocol": task.protocol}

    checkpoint = output.with_name(output.name + ".partial")
    key = fingerprint(options, settings, documents)
    done = _load_checkpoint(checkpoint, key, documents, task.result_fields)
    batches = [
        batch for batch in planned_batches(documents, options.batch_size) if any(d["id"] not in done for d in batch)
    ]
    todo = [doc for batch in batches for doc in batch]
    if done:
        print(f"resuming: {len(done)} of {len(documents)} documents already done", file=sys.stderr)
    print(f"provenance: {json.dumps(provenance)}", file=sys.stderr)
    press = build_press(
        method, options.threshold, settings, model, clock, options.compression_ratio, options.adaptive_safeguard
    )
    evaluation = Evaluation(
        options.model, options.chunk_size, options.graphs, options.task_settings, options.prefill_batch_size or None
    )
    with clock.stage("surrogate_load"):  # and the task's own setup (summarization's tokenizer)
        evaluate_batch = work_of(options.task).evaluator(evaluation, model, press, clock)

    # Start the checkpoint afresh from what is kept (a line cut short by a kill is dropped), so
    # that the lines appended below never follow a fragment.
    with clock.stage("writing"):
        write_jsonl_atomic(checkpoint, [{"fingerprint": key}, *done.values()])
    with (
        open(checkpoint, "a") as log,
        tqdm(total=sum(len(d["input_ids"]) for d in todo), unit="tok", file=sys.stderr) as bar,
    ):
        for batch in batches:
            with clock.stage("model_work"):
                results = evaluate_batch(batch)
            with clock.stage("writing"):
                ran = {**provenance, **what_ran()}
                for doc, result in zip(batch, results, strict=True):
                    done[doc["id"]] = {"id": doc["id"], **result, "provenance": ran}
                    log.write(json.dumps(done[doc["id"]]) + "\n")
                log.flush()
                os.fsync(log.fileno())
            bar.update(sum(len(d["input_ids"]) for d in batch))

    with clock.stage("writing"):
        write_jsonl_atomic(output, (done[d["id"]] for d in documents))
        checkpoint.unlink()
    clock.save(
        output, documents=len(todo), tokens=sum(len(d["input_ids"]) for d in todo), batch_size=options.batch_size,
        device=provenance["device"], gpus=options.gpu_count, **what_ran(),
    )  # fmt: skip


def check_compression_ratio(options: "EvaluateOptions", task) -> float | None:
    """A compression ratio is kvpress's budget for a scored method in kvpress's protocol, applied
    once to the context; returns the threshold the method is resolved with (-inf, which every
    scored method accepts, or None for a method without one; the press does not read it)."""
    ratio = options.compression_ratio
    if ratio is None:
        raise KvsweepError("--adaptive-safeguard shares a compression ratio's budget (AdaKV): give --compression-ratio")
    if options.adaptive_safeguard is not None and not 0 <= options.adaptive_safeguard <= 1:
        raise KvsweepError(f"--adaptive-safeguard must lie in [0, 1], got {options.adaptive_safeguard}")
    if not 0 <= ratio < 1:
        raise KvsweepError(f"--compression-ratio must lie in [0, 1) (the share of the context evicted), got {ratio}")
    if options.threshold is not None:
        raise KvsweepError("--compression-ratio and --threshold are two budgets for one job: give one")
    method = get_method(options.method)
    if not method.takes_ratios:
        raise KvsweepError(f"--compression-ratio: method '{options.method}' has no score to keep the top of")
    if options.adaptive_safeguard is not None and not method.adaptive_budget:
        raise KvsweepError(
            f"--adaptive-safeguard: method '{method.name}' shares its budget at a ratio its own way, not as AdaKV"
        )
    if method.ranks_at_ratio and options.settings.get(method.sweep) not in (None, 0):
        flag = "--" + method.sweep.replace("_", "-")
        raise KvsweepError(
            f"{flag}: at a compression ratio, method '{method.name}' keeps its sinks and the most recent positions "
            "the ratio leaves (kvpress's budget), not a window: give one of the two"
        )
    if task.protocol != "kvpress":
        raise KvsweepError(
            f"--compression-ratio is kvpress's budget, for the tasks in kvpress's protocol "
            f"({', '.join(kvpress_protocol_tasks())}); "
            f"task {task.name} streams"
        )
    if options.task_settings.get("decoding"):
        raise KvsweepError(
            "--compression-ratio compresses the context once: --decoding must be false (a threshold decides while decoding)"
        )
    return -math.inf if method.takes_threshold else None


def planned_batches(documents: list[dict], batch_size: int) -> list[list[dict]]:
    """The shard's documents in batches of similar length, longest first. A resumed job runs the
    batches it has not finished as they were planned, a finished document of an unfinished batch
    with them: a document's batch changes the last bits of its result (padding changes the shapes
    the kernels reduce over), so a resumed job gives the uninterrupted job's numbers."""
    ordered = sorted(documents, key=lambda d: -len(d["input_ids"]))
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def fingerprint(options: "EvaluateOptions", settings: dict, documents: list[dict]) -> str:
    """What determines a document's result: a checkpoint of other inputs is never reused. Besides
    the settings: the shard's documents themselves, the identity of the model's and the
    surrogate's weights (not only their names: a folder retrained in place is another model), the
    device and the kvsweep commit."""
    names = ("model", "method", "threshold", "chunk_size", "max_length", "dtype", "device", "task", "task_settings")
    key = {k: getattr(options, k) for k in names}
    if options.compression_ratio is not None:
        key["compression_ratio"] = options.compression_ratio
    if options.adaptive_safeguard is not None:
        key["adaptive_safeguard"] = options.adaptive_safeguard
    # The committed code (a fix between two attempts must not be mixed with results from before it);
    # uncommitted edits are left out, or editing config.yaml would discard every checkpoint.
    key["code"] = source_revision().split("+")[0]
    key["documents"] = hashlib.sha256(json.dumps(documents, sort_keys=True).encode()).hexdigest()
    key["model_weights"] = weights_identity(options.model)
    if "kvzap_surrogate" in settings:
        surrogate = settings["kvzap_surrogate"] or default_surrogate(options.model, settings["kvzap_type"])
        key["surrogate_weights"] = weights_identity(surrogate)
    return hashlib.sha256(json.dumps([key, settings], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _json_object(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _load_checkpoint(path: Path, fingerprint: str, documents: list[dict], fields: set[str]) -> dict[str, dict]:
    """The finished documents of a checkpoint written with the same fingerprint. A checkpoint of
    other inputs, or an unreadable header, is ignored; reading stops at the first record that is
    not whole (a line cut short by a kill, or corruption): what follows is recomputed."""
    if not path.exists():
        return {}
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    header = _json_object(lines[0]) if lines else None
    if header is None or header.get("fingerprint") != fingerprint:
        why = "was written for other inputs" if header and "fingerprint" in header else "has an unreadable header"
        print(f"checkpoint {path.name} {why}: recomputing every document", file=sys.stderr)
        return {}
    wanted = {doc["id"] for doc in documents}
    done = {}
    for lineno, line in enumerate(lines[1:], start=2):
        record = _json_object(line)
        if (
            record is None
            or not isinstance(record.get("id"), str)
            or record["id"] not in wanted
            or not fields <= set(record)
        ):
            print(f"checkpoint {path.name}, line {lineno}: not a whole result; recomputing from there", file=sys.stderr)
            break
        done[record["id"]] = record
    return done
