"""Reading what the study's jobs wrote, checked: evaluation shards (whose documents must be exactly
those of their prepared shard, once each) and calibration records. A result that cannot be trusted
is one message naming its file, never a table computed from part of it."""

import math
import re
from pathlib import Path

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import read_jsonl
from kvsweep.core.thresholds import ratio_of_folder
from kvsweep.study.calibrations import read_calibrations  # noqa: F401 (the results' calibrations)
from kvsweep.study.tasks import all_tasks, get_task

# <task>/<method>/<value>/shardNNN.jsonl, as the evaluate rule writes them.
_SHARD_NAME = re.compile(r"^shard(\d{3})\.jsonl$")
_DOCUMENTS_NAME = re.compile(r"^shard(\d{3})\.documents\.jsonl$")
# How a result that cannot be trusted is made again.
RERUN = "delete the file and run the workflow again (its evaluation job reruns)"


def result_shard(path: str) -> tuple[str, str, str]:
    """(method, swept value, shard number) of an evaluation output `.../<method>/<value>/shardNNN.jsonl`;
    the value is a threshold, a swept setting, `ratio_<r>` (a compression ratio) or none (the baseline's)."""
    parts = Path(path).parts
    match = _SHARD_NAME.match(parts[-1]) if parts else None
    if match is None or len(parts) < 3:
        raise KvsweepError(f"{path}: not an evaluation result (expected <task>/<method>/<value>/shardNNN.jsonl)")
    try:
        if ratio_of_folder(parts[-2]) is not None:
            return parts[-3], parts[-2], match.group(1)
    except KvsweepError as err:
        raise KvsweepError(f"{path}: {err}") from None
    try:
        value = 0.0 if parts[-2] == "none" else float(parts[-2])  # none: the baseline's
    except ValueError:
        value = math.nan
    if math.isnan(value) or value == math.inf:
        raise KvsweepError(
            f"{path}: '{parts[-2]}' is no swept value (a number, -inf, ratio_<r>, or none) in <task>/<method>/<value>/"
        )
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
        if not Path(path).is_file():  # a mistyped path: say so before judging its name
            raise KvsweepError(f"{path}: no such file")
        method, value, shard = result_shard(path)
        resolved = Path(path).resolve()
        if resolved in seen_files:
            raise KvsweepError(f"{path}: given twice (also as {seen_files[resolved]})")
        seen_files[resolved] = path
        try:
            records = read_jsonl(path, required=required)
        except KvsweepError as err:
            raise KvsweepError(f"{err}; {RERUN}") from None
        ids = [str(record["id"]) for record in records]
        if listed and shard not in listed:
            raise KvsweepError(f"{path}: no prepared shard {shard} among the document lists given")
        if shard in listed and sorted(ids) != sorted(listed[shard]):
            mismatch = _mismatch(ids, listed[shard], "its prepared shard lists")
            raise KvsweepError(f"{path}: holds {mismatch}; {RERUN}")
        axis = "" if value == "none" else swept.get(method, "threshold")
        if ratio_of_folder(value) is not None:
            axis = "compression_ratio"
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


def baseline_of(rows: "pd.DataFrame", baseline: "pd.DataFrame", label: str = "") -> "pd.DataFrame":  # noqa: F821
    """The baseline's rows (indexed by id) for the documents of `rows`, in their order. Documents
    are paired by id, and must have been read at the same length as the baseline's (else the two
    results come from different inputs, e.g. shards prepared again in between)."""
    if baseline.empty:
        raise KvsweepError("no baseline results: the paired differences need method 'baseline'")
    missing = sorted(set(rows.id) - set(baseline.index))
    if missing:
        raise KvsweepError(f"{label}documents without a baseline result: {missing[:5]}")
    base = baseline.loc[rows.id]
    length = next(task.length_field for task in all_tasks().values() if task.length_field in rows)
    differ = sorted(set(rows.id[rows[length].to_numpy() != base[length].to_numpy()]))
    if differ:
        raise KvsweepError(
            f"{label}document(s) {differ[:5]} were read with another {length} than the baseline's: the results "
            "come from different inputs (rerun the jobs of one of them)"
        )
    return base


def configurations(results: "pd.DataFrame"):  # noqa: F821
    """(method, swept value, its documents, the baseline's rows for the same documents)."""
    baseline = results[results.method == "baseline"].set_index("id")
    for (method, value), group in results.groupby(["method", results.value.fillna("")], sort=False):
        yield method, value, group, baseline_of(group, baseline, f"{method} at {value}: ")


def densities(group: "pd.DataFrame") -> dict:  # noqa: F821
    compressible = group.kv_total_compressible.sum()
    return {
        "kv_density": group.kv_kept.sum() / group.kv_total.sum(),
        "kv_density_compressible": group.kv_kept_compressible.sum() / compressible if compressible else math.nan,
    }


def costs(group: "pd.DataFrame", base: "pd.DataFrame", decoding: bool = False) -> dict:  # noqa: F821
    """What a configuration's documents cost beside the baseline's (the same documents):
    `kv_memory_GiB`, the mean of each document's share of its batch's KV cache (the masked engine
    holds every position; the compacting one what is kept), and its ratio to the baseline's; with
    `decoding`, `decode_tok_s`, the mean of the batches' decoding speeds, and its ratio. NaN where
    the result lines do not record them (written before kvsweep did)."""

    def mean(rows, column):
        return rows[column].astype(float).mean() if column in rows else math.nan

    memory, base_memory = mean(group, "kv_cache_bytes"), mean(base, "kv_cache_bytes")
    found = {
        "kv_memory_GiB": memory / 2**30,
        "kv_memory_vs_baseline": memory / base_memory if base_memory else math.nan,
    }
    if decoding:
        speed, base_speed = mean(group, "decode_tok_s"), mean(base, "decode_tok_s")
        found.update(decode_tok_s=speed, decode_vs_baseline=speed / base_speed if base_speed else math.nan)
    return found


# A method's compression ratios (kvpress's fixed budgets) are another policy than its thresholds:
# comparisons and figures draw them as a curve of their own, `<method>@ratio`.
RATIO_CURVE = "{}@ratio"


def curve_names(table: "pd.DataFrame") -> "pd.Series":  # noqa: F821
    """Each row's curve: its method, or `<method>@ratio` for a compression ratio (`swept`)."""
    if "swept" not in table:
        return table.method
    at_ratio = table.swept.fillna("") == "compression_ratio"
    return table.method.where(~at_ratio, table.method.map(RATIO_CURVE.format))


def ordered(table: "pd.DataFrame") -> "pd.DataFrame":  # noqa: F821
    """Baseline first, then by method, each method's thresholds (or windows) by value, then its
    compression ratios by value."""
    ratio = table.value.map(lambda t: ratio_of_folder(t) if t else None)
    order = [r if r is not None else (float(t) if t else -math.inf) for r, t in zip(ratio, table.value, strict=True)]
    table = table.assign(_base=table.method != "baseline", _ratio=ratio.notna(), _t=order)
    table = table.sort_values(["_base", "method", "_ratio", "_t"])
    return table.drop(columns=["_base", "_ratio", "_t"]).reset_index(drop=True)
