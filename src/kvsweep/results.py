"""Reading what the study's jobs wrote, checked: evaluation shards (whose documents must be exactly
those of their prepared shard, once each) and calibration records. A result that cannot be trusted
is one message naming its file, never a table computed from part of it."""

import json
import re
from pathlib import Path

from kvsweep.errors import KvsweepError
from kvsweep.io import read_jsonl
from kvsweep.tasks import get_task

# <task>/<method>/<value>/shardNNN.jsonl, as the evaluate rule writes them.
_SHARD_NAME = re.compile(r"^shard(\d{3})\.jsonl$")
_DOCUMENTS_NAME = re.compile(r"^shard(\d{3})\.documents\.jsonl$")
CALIBRATION_FIELDS = ("target_density", "threshold")  # what score and comparison read of a record


def result_shard(path: str) -> tuple[str, str, str]:
    """(method, swept value, shard number) of an evaluation output `.../<method>/<value>/shardNNN.jsonl`."""
    parts = Path(path).parts
    match = _SHARD_NAME.match(parts[-1]) if parts else None
    if match is None or len(parts) < 3:
        raise KvsweepError(f"{path}: not an evaluation result (expected <task>/<method>/<value>/shardNNN.jsonl)")
    return parts[-3], parts[-2], match.group(1)


def prepared_documents(paths: list[str]) -> dict[str, list[str]]:
    """Shard number -> the ids its prepared shard lists (`shardNNN.documents.jsonl`), in order."""
    listed = {}
    for path in paths:
        match = _DOCUMENTS_NAME.match(Path(path).name)
        if match is None:
            raise KvsweepError(f"{path}: not a prepared shard's document list (shardNNN.documents.jsonl)")
        listed[match.group(1)] = [str(entry["id"]) for entry in read_jsonl(path, required=("id",))]
    return listed


def load_results(
    paths: list[str], task: str = "perplexity", swept: dict[str, str] | None = None, documents: list[str] = ()
) -> "pd.DataFrame":  # noqa: F821
    """Every result line of the inputs, with its method and swept value (read from the path) and
    what that value is (`swept`: "threshold" unless `swept` names another setting for the method,
    e.g. streaming_llm's sliding_window).

    Checked before anything is computed from them: no file given twice; each shard holds the
    documents of its prepared shard exactly, once each (`documents`: the prepared shards' lists,
    where given); and every configuration covers the same documents as the baseline, once each."""
    swept = swept or {}
    required = tuple(sorted(get_task(task).result_fields))
    listed = prepared_documents(list(documents))
    seen_files: dict[Path, str] = {}
    rows = []
    for path in paths:
        method, value, shard = result_shard(path)
        resolved = Path(path).resolve()
        if resolved in seen_files:
            raise KvsweepError(f"{path}: given twice (also as {seen_files[resolved]})")
        seen_files[resolved] = path
        records = read_jsonl(path, required=required)
        ids = [str(record["id"]) for record in records]
        if listed and shard not in listed:
            raise KvsweepError(f"{path}: no prepared shard {shard} among the document lists given")
        if shard in listed and sorted(ids) != sorted(listed[shard]):
            mismatch = _mismatch(ids, listed[shard], "its prepared shard lists")
            raise KvsweepError(f"{path}: holds {mismatch}; run its job again")
        axis = "" if value == "none" else swept.get(method, "threshold")
        for record in records:
            rows.append({**record, "id": str(record["id"]), "method": method, "swept": axis,
                         "value": None if value == "none" else value})  # fmt: skip
    if not rows:
        raise KvsweepError("no evaluated documents in the inputs")
    import pandas as pd  # (here: the workflow reads calibrations while planning, without pandas)

    results = pd.DataFrame(rows)
    _same_documents_once(results)
    return results


def _mismatch(found: list[str], expected: list[str], reference: str) -> str:
    """How the ids found differ from those expected: "7 documents where <reference> 10: 3 missing (...)"."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    twice = sorted({i for i in found if found.count(i) > 1})
    said = [f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
            f"{len(extra)} not among them ({', '.join(extra[:3])})" if extra else "",
            f"{len(twice)} more than once ({', '.join(twice[:3])})" if twice else ""]  # fmt: skip
    return f"{len(found)} documents where {reference} {len(expected)}: " + "; ".join(s for s in said if s)


def _same_documents_once(results) -> None:
    """Every (method, value) holds each document once, and the same documents as the baseline."""
    groups = results.groupby(["method", results.value.fillna("none")], sort=False).id
    base = results.id[results.method == "baseline"].tolist()
    for (method, value), ids in groups:
        ids = ids.tolist()
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise KvsweepError(f"{method} at {value}: document(s) {twice[:5]} appear more than once in its results")
        if base and set(ids) != set(base):
            raise KvsweepError(f"{method} at {value}: {_mismatch(ids, base, 'the baseline has')}")


def read_calibrations(paths) -> list[dict]:
    """The records of calibration jobs (calibration/<method>/<target>.json): method (the config
    entry, from the path: the record names the method it ran), target_density, threshold
    (canonical), density, steps, documents."""
    records = []
    for path in paths:
        path = Path(path)
        if path.name.endswith(".stages.json"):
            raise KvsweepError(
                f"{path}: a job's stage record, not a calibration record (calibration/<method>/<target>.json)"
            )
        try:
            record = json.loads(path.read_text())
        except OSError as err:
            raise KvsweepError(f"{path}: {err.strerror or err}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise KvsweepError(f"{path}: not a whole calibration record ({err})") from None
        missing = [key for key in CALIBRATION_FIELDS if not isinstance(record, dict) or key not in record]
        if missing:
            raise KvsweepError(f"{path}: not a calibration record (no {', '.join(missing)})")
        records.append({**record, "method": path.parent.name})
    return records
