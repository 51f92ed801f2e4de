"""Prepare evaluation shards: load documents, tokenize, truncate, skip short ones, shard.

For each task, DIR/<task>/shard000.jsonl ... in the engine's input format: perplexity lines are
{"id", "input_ids"} (the report's tokens, truncated to max_length); summarization lines are
{"id", "input_ids", "references"} (LongBench's prompt, cut in the middle of the report so that
the whole model input fits max_length, and the reference summaries). DIR/<task>/documents.jsonl
lists id, source index, tokens and whether each was truncated. With skip_documents N the first
N qualifying documents are left out (the calibration documents are the ones after the study's, so
the two never overlap). The order is the source's and ids are stable: the id field if given,
else "<split>-<index in the source>". Exactly ceil(max_documents / shard_size) shards are written,
so the workflow knows its jobs before the data exists; if fewer documents qualify, the last shards
hold fewer (or none) and the log says so.

With shard I only shard I is written (documents I * shard_size up to max_documents, at most
shard_size of them), with its own list DIR/<task>/shardNNN.documents.jsonl. Shard I depends only on
the documents before its end: the workflow runs one such job per shard, and gives a full shard's
job the same arguments whatever the study's size, so adding documents leaves full shards as they
were (only the last, partial, shard and the new ones are written again).
"""

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import checked_text, iter_jsonl, record_digests, write_jsonl_atomic
from kvsweep.study.shards import n_shards
from kvsweep.tasks import Preparation, work_of


@dataclass
class PrepareOptions:
    source: str  # hub dataset id, local folder of data files, or local .jsonl file
    tokenizer: str  # hub id or folder of the model whose tokenizer to use
    max_documents: int
    max_length: int
    shard_size: int
    output_dir: str
    split: str = "validation"
    subset: str | None = None  # the dataset's configuration name, e.g. gov_report in a LongBench copy
    text_field: str = "report"
    summary_field: str = "summary"  # reference summary (text or list of texts)
    id_field: str | None = None
    min_length: int = 2
    skip_documents: int = 0  # leave out the first N qualifying documents (calibration documents follow the study's)
    shard: int | None = None  # write only this shard (0-based) and its document list
    tasks: list[str] = field(default_factory=lambda: ["perplexity"])


def load_records(source: str, split: str, subset: str | None = None):
    """Yield the raw records of a local .jsonl file, or of a split of a dataset on the hub (or in a
    local folder of data files), with its configuration name `subset` if it has several."""
    if source.endswith(".jsonl"):
        yield from iter_jsonl(source)
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


def run(options: PrepareOptions) -> dict:
    least = {"max_documents": 1, "shard_size": 1, "max_length": 2, "min_length": 2, "skip_documents": 0}
    for name, minimum in least.items():
        if getattr(options, name) < minimum:
            raise KvsweepError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(options, name)}")
    if options.id_field == "":
        raise KvsweepError("--id-field is empty: name the field that holds the ids, or leave it out to number them")
    if options.shard is not None and not 0 <= options.shard < n_shards(options.max_documents, options.shard_size):
        raise KvsweepError(
            f"--shard {options.shard}: {options.max_documents} documents make shards 0 to "
            f"{n_shards(options.max_documents, options.shard_size) - 1} of {options.shard_size}"
        )
    from kvsweep.engine.models import load_tokenizer

    tokenizer = load_tokenizer(options.tokenizer)
    tasks = [work_of(name) for name in options.tasks]
    preparation = Preparation(options.source, options.max_length, options.summary_field)
    kept, stats = [], {"read": 0, "skipped_short": 0, "truncated": 0}
    passed = 0  # qualifying documents left to the study (--skip-documents)
    # Every qualifying document read, skipped ones included: an id may name one document only, and
    # a document after the skipped ones (calibration, a surrogate's training) may not repeat one of
    # them (the study's own, which it would then see twice).
    ids_seen: dict[str, int] = {}
    texts_skipped: dict[str, int] = {}
    progress = tqdm(total=options.max_documents, unit="doc", file=sys.stderr, desc="prepare")
    # A local JSONL's records up to each document, as a digest: the workflow reruns a shard only
    # when the records it read change, not when records are appended after them.
    digests = record_digests(options.source) if options.source.endswith(".jsonl") else None
    for index, record in enumerate(load_records(options.source, options.split, options.subset)):
        source_sha256 = next(digests) if digests is not None else None
        stats["read"] += 1
        if options.text_field not in record:
            raise KvsweepError(
                f"{options.source}, record {index}: no field '{options.text_field}' (fields: {', '.join(record)})"
            )
        if options.id_field and options.id_field not in record:
            raise KvsweepError(f"{options.source}, record {index}: no id field '{options.id_field}'")
        text = checked_text(record[options.text_field], options.source, index, options.text_field)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) < options.min_length:
            stats["skipped_short"] += 1
            continue
        doc_id = document_id(record, options, index)
        if doc_id in ids_seen:
            raise KvsweepError(
                f"{options.source}, records {ids_seen[doc_id]} and {index}: both have the id '{doc_id}' (field "
                f"'{options.id_field}'); every document needs its own id"
            )
        ids_seen[doc_id] = index
        text_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if passed < options.skip_documents:
            passed += 1
            texts_skipped.setdefault(text_digest, index)
            continue
        if text_digest in texts_skipped:
            raise KvsweepError(
                f"{options.source}, record {index} ('{doc_id}') has the text of record {texts_skipped[text_digest]}, "
                f"one of the {options.skip_documents} documents before it (the study's): calibrating or training on "
                "it would use a document the study evaluates; remove the repeated record from the source"
            )
        truncated = len(ids) > options.max_length
        stats["truncated"] += truncated
        doc = {"id": doc_id, "index": index, "input_ids": ids[: options.max_length], "truncated": truncated,
               "source_sha256": source_sha256}  # fmt: skip
        for task in tasks:
            task.prepare_document(doc, record, text, tokenizer, preparation, stats, index)
        kept.append(doc)
        progress.update()
        if len(kept) == options.max_documents:
            break  # the records after are not read: a line appended there can break no shard
    progress.close()
    if not kept and options.skip_documents:
        raise KvsweepError(
            f"no document of '{options.source}' with at least {options.min_length} tokens is left after the first "
            f"{options.skip_documents} ({stats['read']} read): the calibration (and a surrogate's training) needs documents beyond the study's"
        )
    if not kept:
        raise KvsweepError(
            f"no document of '{options.source}' has at least {options.min_length} tokens ({stats['read']} read)"
        )
    repeated = len(kept) - len({hashlib.sha256(bytes(str(doc["input_ids"]), "ascii")).digest() for doc in kept})
    if repeated:
        print(f"prepare: {repeated} document(s) repeat the tokens of another one of the study", file=sys.stderr)

    out = Path(options.output_dir)
    count = n_shards(options.max_documents, options.shard_size)

    def members(shard: int) -> list[dict]:
        return kept[shard * options.shard_size : (shard + 1) * options.shard_size]

    for shard in range(count) if options.shard is None else [options.shard]:
        for task in tasks:
            write_jsonl_atomic(out / task.task.name / f"shard{shard:03d}.jsonl", map(task.shard_line, members(shard)))
    listing = "documents.jsonl" if options.shard is None else f"shard{options.shard:03d}.documents.jsonl"
    listed = kept if options.shard is None else members(options.shard)
    for task in tasks:
        write_jsonl_atomic(out / task.task.name / listing, map(document_entry, listed))
    stats["kept"] = len(kept)
    print(
        f"prepare: read {stats['read']} documents, kept {stats['kept']}, skipped {stats['skipped_short']} shorter than "
        f"{options.min_length} tokens, truncated {stats['truncated']} to {options.max_length} tokens; "
        + (
            f"{count} shard(s)" if options.shard is None else f"shard {options.shard} of {options.shard_size} documents"
        ),
        file=sys.stderr,
    )
    for task in tasks:
        if (message := task.report(stats, preparation)) is not None:
            print(message, file=sys.stderr)
    if stats["kept"] < options.max_documents:
        print(
            f"prepare: only {stats['kept']} of the {options.max_documents} documents asked for qualify", file=sys.stderr
        )
    return stats


def document_id(record: dict, options: PrepareOptions, index: int) -> str:
    """The record's id: its id field (a text or an integer), else `<split>-<index>`."""
    if not options.id_field:
        return f"{options.split}-{index:05d}"
    value = record[options.id_field]
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise KvsweepError(
            f"{options.source}, record {index}: the id field '{options.id_field}' holds {value!r}; an id is a "
            "non-empty text or an integer"
        )
    return str(value)


def document_entry(doc: dict) -> dict:
    """A document's line in documents.jsonl: where it came from and its length."""
    entry = {"id": doc["id"], "index": doc["index"], "n_tokens": len(doc["input_ids"]), "truncated": doc["truncated"]}
    if doc["source_sha256"] is not None:  # the records read up to this one (a local JSONL's)
        entry["source_sha256"] = doc["source_sha256"]
    return entry
