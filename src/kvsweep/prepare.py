"""Prepare evaluation shards: load documents, tokenize, truncate, skip short ones, shard.

    python -m kvsweep.prepare --source ccdv/govreport-summarization --split validation
        --text-field report [--summary-field summary] [--id-field ID] --tokenizer MODEL
        --max-documents 100 --max-length 8192 --min-length 2 --shard-size 10
        --tasks perplexity summarization --output-dir DIR

For each task, DIR/<task>/shard000.jsonl ... in the engine's input format: perplexity lines are
{"id", "input_ids"} (the report's tokens, truncated to max_length); summarization lines are
{"id", "input_ids", "references"} (LongBench's prompt, cut in the middle of the report so that
the whole model input fits max_length, and the reference summaries). DIR/<task>/documents.jsonl
lists id, source index, tokens and whether each was truncated. With --skip-documents N the first
N qualifying documents are left out (the calibration documents are the ones after the study's, so
the two never overlap). The order is the source's and ids are stable: the id field if given,
else "<split>-<index in the source>". Exactly ceil(max_documents / shard_size) shards are written,
so the workflow knows its jobs before the data exists; if fewer documents qualify, the last shards
hold fewer (or none) and the log says so.

With --shard I only shard I is written (documents I * shard_size up to max_documents, at most
shard_size of them), with its own list DIR/<task>/shardNNN.documents.jsonl. Shard I depends only on
the documents before its end: the workflow runs one such job per shard, and gives a full shard's
job the same arguments whatever the study's size, so adding documents leaves full shards as they
were (only the last, partial, shard and the new ones are written again).
"""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from kvsweep.config import n_shards
from kvsweep.errors import KvsweepError, readable_errors
from kvsweep.io import read_jsonl, record_digests, write_jsonl_atomic
from kvsweep.stages import start_job
from kvsweep.tasks import all_tasks, get_task


def load_records(source: str, split: str, subset: str | None = None):
    """Yield the raw records of a local .jsonl file, or of a split of a dataset on the hub (or in a
    local folder of data files), with its configuration name `subset` if it has several."""
    if source.endswith(".jsonl"):
        yield from read_jsonl(source)
        return
    if Path(source).is_file():
        raise KvsweepError(f"dataset source '{source}' is a local file but not a .jsonl file")
    import datasets

    try:
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as err:  # noqa: BLE001 (datasets raises many types for a missing dataset, split or network)
        which = f"'{source}'" + (f" (subset '{subset}')" if subset else "")
        raise KvsweepError(
            f"dataset {which}, split '{split}', could not be loaded: {str(err).splitlines()[0]}"
        ) from None
    yield from dataset


def checked_text(value, source: str, index: int, field: str) -> str:
    """A field's text, which must be a string of valid Unicode (JSON can carry lone surrogates such
    as \\ud800, which no tokenizer takes)."""
    if not isinstance(value, str):
        raise KvsweepError(f"{source}, record {index}: field '{field}' is not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise KvsweepError(
            f"{source}, record {index}: field '{field}' is not valid Unicode text "
            f"(a lone surrogate {value[err.start]!r} at character {err.start})"
        ) from None
    return value


def prepare(args) -> dict:
    for name in ("max_documents", "max_length", "shard_size"):
        if getattr(args, name) < 1:
            raise KvsweepError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.shard is not None and not 0 <= args.shard < n_shards(args.max_documents, args.shard_size):
        raise KvsweepError(
            f"--shard {args.shard}: {args.max_documents} documents make shards 0 to "
            f"{n_shards(args.max_documents, args.shard_size) - 1} of {args.shard_size}"
        )
    from kvsweep.modeling import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    tasks = [get_task(name) for name in args.tasks]
    kept, stats = [], {"read": 0, "skipped_short": 0, "truncated": 0}
    passed = 0  # qualifying documents left to the study (--skip-documents)
    progress = tqdm(total=args.max_documents, unit="doc", file=sys.stderr, desc="prepare")
    # A local JSONL's records up to each document, as a digest: the workflow reruns a shard only
    # when the records it read change, not when records are appended after them.
    digests = record_digests(args.source) if args.source.endswith(".jsonl") else None
    for index, record in enumerate(load_records(args.source, args.split, args.subset)):
        if len(kept) == args.max_documents:
            break
        source_sha256 = next(digests) if digests is not None else None
        stats["read"] += 1
        if args.text_field not in record:
            raise KvsweepError(
                f"{args.source}, record {index}: no field '{args.text_field}' (fields: {', '.join(record)})"
            )
        if args.id_field and args.id_field not in record:
            raise KvsweepError(f"{args.source}, record {index}: no id field '{args.id_field}'")
        text = checked_text(record[args.text_field], args.source, index, args.text_field)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) < args.min_length:
            stats["skipped_short"] += 1
            continue
        if passed < args.skip_documents:
            passed += 1
            continue
        truncated = len(ids) > args.max_length
        stats["truncated"] += truncated
        doc_id = str(record[args.id_field]) if args.id_field else f"{args.split}-{index:05d}"
        doc = {"id": doc_id, "index": index, "input_ids": ids[: args.max_length], "truncated": truncated,
               "source_sha256": source_sha256}  # fmt: skip
        for task in tasks:
            task.prepare_document(doc, record, text, tokenizer, args, stats, index)
        kept.append(doc)
        progress.update()
    progress.close()
    if not kept and args.skip_documents:
        raise KvsweepError(
            f"no document of '{args.source}' with at least {args.min_length} tokens is left after the first "
            f"{args.skip_documents} ({stats['read']} read): the calibration (and a surrogate's training) needs documents beyond the study's"
        )
    if not kept:
        raise KvsweepError(
            f"no document of '{args.source}' has at least {args.min_length} tokens ({stats['read']} read)"
        )
    if len({doc["id"] for doc in kept}) != len(kept):
        raise KvsweepError(f"field '{args.id_field}' does not hold unique ids")

    out = Path(args.output_dir)
    count = n_shards(args.max_documents, args.shard_size)

    def members(shard: int) -> list[dict]:
        return kept[shard * args.shard_size : (shard + 1) * args.shard_size]

    for shard in range(count) if args.shard is None else [args.shard]:
        for task in tasks:
            write_jsonl_atomic(out / task.name / f"shard{shard:03d}.jsonl", map(task.shard_line, members(shard)))
    listing = "documents.jsonl" if args.shard is None else f"shard{args.shard:03d}.documents.jsonl"
    listed = kept if args.shard is None else members(args.shard)
    for task in tasks:
        write_jsonl_atomic(out / task.name / listing, map(document_entry, listed))
    stats["kept"] = len(kept)
    print(
        f"prepare: read {stats['read']} documents, kept {stats['kept']}, skipped {stats['skipped_short']} shorter than "
        f"{args.min_length} tokens, truncated {stats['truncated']} to {args.max_length} tokens; "
        + (f"{count} shard(s)" if args.shard is None else f"shard {args.shard} of {args.shard_size} documents"),
        file=sys.stderr,
    )
    for task in tasks:
        if (message := task.report(stats, args)) is not None:
            print(message, file=sys.stderr)
    if stats["kept"] < args.max_documents:
        print(f"prepare: only {stats['kept']} of the {args.max_documents} documents asked for qualify", file=sys.stderr)
    return stats


def document_entry(doc: dict) -> dict:
    """A document's line in documents.jsonl: where it came from and its length."""
    entry = {"id": doc["id"], "index": doc["index"], "n_tokens": len(doc["input_ids"]), "truncated": doc["truncated"]}
    if doc["source_sha256"] is not None:  # the records read up to this one (a local JSONL's)
        entry["source_sha256"] = doc["source_sha256"]
    return entry


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--subset", help="the dataset's configuration name, e.g. gov_report in a LongBench copy")
    parser.add_argument("--text-field", default="report")
    parser.add_argument("--summary-field", default="summary", help="reference summary (text or list of texts)")
    parser.add_argument("--id-field")
    parser.add_argument("--tokenizer", required=True, help="hub id or folder of the model whose tokenizer to use")
    parser.add_argument("--max-documents", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--min-length", type=int, default=2)
    parser.add_argument("--shard-size", type=int, required=True)
    parser.add_argument(
        "--skip-documents",
        type=int,
        default=0,
        help="leave out the first N qualifying documents (calibration documents follow the study's)",
    )
    parser.add_argument("--shard", type=int, help="write only this shard (0-based) and its document list")
    parser.add_argument("--tasks", nargs="+", default=["perplexity"], choices=list(all_tasks()))
    parser.add_argument("--output-dir", required=True)
    return parser.parse_args(argv)


def main(argv=None):
    with readable_errors("kvsweep.prepare"):
        prepare(parse_args(argv))


if __name__ == "__main__":
    start_job("kvsweep.prepare")
    main()
