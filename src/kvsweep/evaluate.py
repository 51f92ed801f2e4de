"""Evaluation of one shard under one method and its swept value (a threshold, or streaming_llm's
window): streaming perplexity or summarization.

    python -m kvsweep.evaluate --model M --data SHARD.jsonl --method NAME [--threshold T]
        [method settings: --sliding-window W --sinks S ...; python -m kvsweep.methods lists them]
        --chunk-size C --max-length N --batch-size B --device cpu|cuda --dtype float32|bfloat16
        [--task perplexity | --task summarization --max-new-tokens 512] --output OUT.jsonl

Perplexity: input lines {"id": str, "input_ids": [int, ...]}; one output line per document, in
input order, with id, n_tokens, nll_sum, n_predicted, kv_kept, kv_total, kv_kept_compressible,
kv_total_compressible. Summarization: input lines also hold "references" (the prompt is in
input_ids); output lines hold id, generated (text), references, n_generated, n_prompt_tokens and the
KV counts at the end of generation. Every line also holds `provenance`: the kvsweep commit, the
torch / transformers / kvpress versions, the device and the dtype it was computed with. Finished
documents are appended to OUT.jsonl.partial as they complete, so a killed or requeued job resumes
where it stopped; OUT.jsonl appears (atomically) only at the end, with OUT.stages.json beside it:
where the job's wall time went (`kvsweep.stages`), also printed at the end of the log.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from kvsweep.errors import KvsweepError, readable_errors
from kvsweep.io import ensure_parent, read_jsonl, write_jsonl_atomic
from kvsweep.job_gpus import add_gpus_argument, job_gpus
from kvsweep.methods import all_settings, get_method
from kvsweep.stages import StageClock, discard_stage_record, exit_without_teardown, start_job
from kvsweep.tasks import all_tasks, get_task, task_settings


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that choose the model, the data and the method: shared with eviction_map."""
    parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    parser.add_argument("--data", required=True, help="shard: JSONL of {id, input_ids}")
    parser.add_argument("--method", required=True, help="a method of kvsweep.methods (python -m kvsweep.methods)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="eviction threshold (not for baseline or streaming_llm, whose sweep is --sliding-window); -inf evicts nothing",
    )
    # One flag per method setting, from the methods' declarations; a method refuses settings it lacks.
    for setting in all_settings().values():
        parser.add_argument(setting.flag, type=setting.parse, help=f"{setting.help} (default: the method's)")
    parser.add_argument("--chunk-size", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True, help="documents are truncated to this many tokens")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    add_gpus_argument(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--cuda-graphs",
        choices=["auto", "off"],
        default="auto",
        help="auto: on a GPU, replay each pass shape as a CUDA graph; off: run every pass eagerly (same results)",
    )


def cuda_graphs_setting(args) -> bool | None:
    """For `stream_nll` / `stream_generate`: None (graphs on a GPU) or False (--cuda-graphs=off)."""
    return None if args.cuda_graphs == "auto" else False


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.evaluate", description=__doc__.split("\n\n")[0])
    add_engine_arguments(parser)
    parser.add_argument("--task", default="perplexity", choices=list(all_tasks()))
    for setting in task_settings().values():  # each task's own settings, from its declaration
        parser.add_argument(setting.flag, type=setting.parse, default=setting.default, help=setting.help)
    parser.add_argument("--output", required=True)
    return parser.parse_args(argv)


def resolve_method(args):
    """Check the numeric arguments and the method's settings; return (method, settings)."""
    for name in ("chunk_size", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise KvsweepError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length < 2:
        raise KvsweepError("--max-length must be at least 2")
    method = get_method(args.method)
    given = {name: getattr(args, name) for name in all_settings() if getattr(args, name) is not None}
    settings = method.resolve(args.threshold, given)
    if method.takes_threshold:
        try:
            method.check_threshold(args.threshold)
        except KvsweepError as err:
            raise KvsweepError(f"--threshold: {err}") from None
    return method, settings


def load_shard(path: str, max_length: int, task: str = "perplexity") -> list[dict]:
    """A shard's documents, checked. A document longer than `max_length` is cut (perplexity: the
    end of a report is dropped) unless its task refuses it (a summarization prompt: its end holds
    the question, so prepare fits it into max_length)."""
    spec = get_task(task)
    documents = read_jsonl(path, required=spec.shard_fields)
    seen = set()
    for doc in documents:
        doc_id, ids = str(doc["id"]), doc["input_ids"]
        if doc_id in seen:
            raise KvsweepError(f"{path}: document id '{doc_id}' appears twice")
        seen.add(doc_id)
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise KvsweepError(f"{path}: document '{doc_id}': input_ids must be a list of token ids (integers >= 0)")
        if len(ids) < 2:
            raise KvsweepError(f"{path}: document '{doc_id}' has {len(ids)} token(s); at least 2 are needed")
        doc["id"] = doc_id
        spec.check_document(doc, max_length, path)
        doc["input_ids"] = ids[:max_length]
    return documents


def check_vocabulary(documents: list[dict], vocabulary: int, path: str) -> None:
    """Token ids beyond the model's embedding: the shard was made with another tokenizer."""
    for doc in documents:
        largest = max(doc["input_ids"])
        if largest >= vocabulary:
            raise KvsweepError(
                f"{path}: document '{doc['id']}' holds token id {largest}, outside the model's vocabulary of "
                f"{vocabulary}: the shard was prepared with another model's tokenizer"
            )


def _fingerprint(args, settings, documents: list[dict]) -> str:
    """What determines a document's result: a checkpoint of other inputs is never reused. Besides
    the settings: the shard's documents themselves, the identity of the model's and the
    surrogate's weights (not only their names: a folder retrained in place is another model), the
    device and the kvsweep commit."""
    from kvsweep.provenance import source_revision, weights_identity

    names = ("model", "method", "threshold", "chunk_size", "max_length", "dtype", "device", "task", *task_settings())
    key = {k: getattr(args, k, None) for k in names}
    # The committed code (a fix between two attempts must not be mixed with results from before it);
    # uncommitted edits are left out, or editing config.yaml would discard every checkpoint.
    key["code"] = source_revision().split("+")[0]
    key["documents"] = hashlib.sha256(json.dumps(documents, sort_keys=True).encode()).hexdigest()
    key["model_weights"] = weights_identity(args.model)
    if "kvzap_surrogate" in settings:
        from kvsweep.presses.kvzap_surrogate import default_surrogate

        surrogate = settings["kvzap_surrogate"] or default_surrogate(args.model, settings["kvzap_type"])
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


def run(args, clock: StageClock | None = None) -> None:
    clock = clock or StageClock()
    method, settings = resolve_method(args)
    for setting in task_settings().values():
        setattr(args, setting.name, setting.check(setting.flag, getattr(args, setting.name)))
    output = ensure_parent(args.output)
    discard_stage_record(output)
    documents = load_shard(args.data, args.max_length, args.task)
    if not documents:
        print(f"{args.data}: empty shard, nothing to evaluate", file=sys.stderr)
        write_jsonl_atomic(output, [])
        clock.save(output, documents=0, tokens=0, batch_size=args.batch_size, gpus=gpu_count(args))
        return

    # Heavy imports only once the input is known to be good. The model first: a hub model not yet
    # in the local cache has its identity (for the fingerprint) only once it has been downloaded.
    model = load_engine_model(args, clock)
    from kvsweep.modeling import vocabulary_size
    from kvsweep.provenance import environment

    check_vocabulary(documents, vocabulary_size(model), args.data)
    provenance = environment(model, args.dtype)

    checkpoint = output.with_name(output.name + ".partial")
    fingerprint = _fingerprint(args, settings, documents)
    done = _load_checkpoint(checkpoint, fingerprint, documents, get_task(args.task).result_fields)
    batches = [
        batch for batch in planned_batches(documents, args.batch_size) if any(d["id"] not in done for d in batch)
    ]
    todo = [doc for batch in batches for doc in batch]
    if done:
        print(f"resuming: {len(done)} of {len(documents)} documents already done", file=sys.stderr)
    print(f"provenance: {json.dumps(provenance)}", file=sys.stderr)
    press = build_press(method, args.threshold, settings, model, clock)
    with clock.stage("surrogate_load"):  # and the task's own setup (summarization's tokenizer)
        evaluate_batch = get_task(args.task).evaluator(args, model, press, clock)

    # Start the checkpoint afresh from what is kept (a line cut short by a kill is dropped), so
    # that the lines appended below never follow a fragment.
    with clock.stage("writing"):
        write_jsonl_atomic(checkpoint, [{"fingerprint": fingerprint}, *done.values()])
    with (
        open(checkpoint, "a") as log,
        tqdm(total=sum(len(d["input_ids"]) for d in todo), unit="tok", file=sys.stderr) as bar,
    ):
        for batch in batches:
            with clock.stage("model_work"):
                results = evaluate_batch(batch)
            with clock.stage("writing"):
                for doc, result in zip(batch, results, strict=True):
                    done[doc["id"]] = {"id": doc["id"], **result, "provenance": provenance}
                    log.write(json.dumps(done[doc["id"]]) + "\n")
                log.flush()
                os.fsync(log.fileno())
            bar.update(sum(len(d["input_ids"]) for d in batch))

    with clock.stage("writing"):
        write_jsonl_atomic(output, (done[d["id"]] for d in documents))
        checkpoint.unlink()
    clock.save(
        output, documents=len(todo), tokens=sum(len(d["input_ids"]) for d in todo), batch_size=args.batch_size,
        device=provenance["device"], gpus=gpu_count(args),
    )  # fmt: skip


def planned_batches(documents: list[dict], batch_size: int) -> list[list[dict]]:
    """The shard's documents in batches of similar length, longest first. A resumed job runs the
    batches it has not finished as they were planned, a finished document of an unfinished batch
    with them: a document's batch changes the last bits of its result (padding changes the shapes
    the kernels reduce over), so a resumed job gives the uninterrupted job's numbers."""
    ordered = sorted(documents, key=lambda d: -len(d["input_ids"]))
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def load_engine_model(args, clock: StageClock):
    """The heavy imports (torch, transformers, and kvpress: the engine's press, which every method,
    the baseline included, runs through), then the model on `args.device`, each billed to its
    stage; from then on, stage boundaries wait for the device."""
    with clock.stage("imports"):
        import kvsweep.presses.streaming_threshold_press  # noqa: F401
        from kvsweep.modeling import load_model, on_device
    if args.device != "cpu":
        clock.synchronize = on_device(args.device, gpu_count(args))
    with clock.stage("model_load"):
        return load_model(args.model, args.dtype, args.device, gpus=gpu_count(args))


def build_press(method, threshold: float | None, settings: dict, model, clock: StageClock):
    """The method's press (None for the baseline) with what it loads (KVzap's surrogate), billed to
    `surrogate_load`."""
    with clock.stage("surrogate_load"):
        press = method.build(threshold, settings)
        if press is not None:
            press.post_init_from_model(model)
    return press


def gpu_count(args) -> int:
    """The GPUs this job computes on (0 on the CPU): those its model is split over."""
    return job_gpus(args.device, args.gpus)


def main(argv=None):
    # First thing: as a command the stages start at the process's start; called in-process (with
    # arguments, as the tests do), at the call.
    clock = StageClock(start=None if argv is None else time.time())
    with readable_errors("kvsweep.evaluate"):
        run(parse_args(argv), clock)


if __name__ == "__main__":
    start_job("kvsweep.evaluate")
    main()
    exit_without_teardown()
