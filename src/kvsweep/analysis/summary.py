"""The summary tables of a task: one row per (method, swept value), with the target density a
calibrated threshold was found for and what its documents were computed with; the per-task
computation is `kvsweep.tasks` (`summarize`)."""

import pandas as pd

from kvsweep.analysis.results import ordered, read_calibrations
from kvsweep.core.io import atomic_path


def add_protocol(table: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The protocol every row of a task's table was measured in ("streaming" or "kvpress"), after
    the method: a reader who copies one row elsewhere keeps what it means."""
    table = table.copy()
    table.insert(1, "protocol", protocol)
    return table


def add_targets(table: pd.DataFrame, calibrations: list[str]) -> pd.DataFrame:
    """The target density each calibrated threshold was found for (several, if two targets landed
    on one threshold); empty for explicit thresholds. `kv_density_compressible` is what it reached."""
    found: dict[tuple[str, str], list[str]] = {}
    for record in read_calibrations(calibrations):
        found.setdefault((record["method"], record["threshold"]), []).append(f"{record['target_density']:g}")
    targets = [";".join(found.get((m, t), [])) for m, t in zip(table.method, table.value, strict=True)]
    return table.assign(target_density=targets)


PROVENANCE_FIELDS = ["protocol", "kvsweep", "torch", "transformers", "kvpress", "device", "dtype", "fusions", "kernels"]


def provenance_table(results: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Per (method, swept value): what its documents were computed with, and how many each way.
    `protocol` is the task's: a result line that does not record its own ran the task's."""
    if "provenance" not in results:
        return pd.DataFrame(columns=["method", "value", *PROVENANCE_FIELDS, "n_docs"])
    fields = pd.DataFrame([p if isinstance(p, dict) else {} for p in results.provenance], index=results.index)
    fields = fields.reindex(columns=PROVENANCE_FIELDS)
    fields["protocol"] = fields["protocol"].fillna(protocol)
    fields = fields.fillna("unrecorded")
    table = pd.concat([results[["method"]], results.value.fillna(""), fields], axis=1)
    counts = table.groupby(list(table.columns), sort=False).size().rename("n_docs").reset_index()
    return ordered(counts)


def write_tables(table: pd.DataFrame, csv_path: str, md_path: str) -> None:
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
