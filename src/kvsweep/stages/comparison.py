"""Method against method at equal KV budget (`kvsweep.analysis.comparison`): the pointwise and the
area tables of a task, as comparison.csv, comparison_auc.csv and comparison.md."""

import sys
from dataclasses import dataclass, field

import pandas as pd

from kvsweep.analysis.comparison import DEFAULT_GRID, compare_methods, markdown, not_along_the_axis
from kvsweep.analysis.results import baseline_of, curve_names, load_results, read_calibrations
from kvsweep.core.io import atomic_path
from kvsweep.study.config import check_bootstrap
from kvsweep.study.tasks import get_task
from kvsweep.tasks import work_of


@dataclass
class ComparisonOptions:
    inputs: list[str]
    output_csv: str
    output_auc_csv: str
    output_md: str
    task: str = "perplexity"
    documents: list[str] = field(default_factory=list)  # the prepared shards' document lists
    calibrations: list[str] = field(default_factory=list)
    density: str = "kv_density_compressible"
    grid: list[float] = field(default_factory=lambda: list(DEFAULT_GRID))
    length_buckets: list[int] = field(default_factory=lambda: [4096, 8192])
    # The calibration tolerance: how far below a method's lowest density a target may lie and still
    # be compared there.
    tolerance: float = 0.01
    n_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0


def per_document_losses(results: pd.DataFrame, task: str) -> pd.DataFrame:
    """One row per (method, swept value, document): `loss` (the task's quality loss against the
    baseline's same document), `weight` (predicted tokens, or 1), the document's length and its
    KV counts."""
    work = work_of(task)
    rows = results[results.method != "baseline"].copy()
    base = baseline_of(rows, results[results.method == "baseline"].set_index("id"))
    loss, weight = work.document_losses(rows, base)
    rows["loss"], rows["weight"] = loss, weight
    rows["length"] = rows[work.task.length_field]
    return rows


def run(options: ComparisonOptions):
    check_bootstrap(options.n_resamples, options.confidence, options.seed)
    rows = per_document_losses(load_results(options.inputs, options.task, documents=options.documents), options.task)
    rows["method"] = curve_names(rows)  # a method's compression ratios: a curve of their own
    left_out = not_along_the_axis(rows, options.density)
    for method, why in left_out.items():
        print(f"comparison: {method} left out: {why}", file=sys.stderr)
    rows = rows[~rows.method.isin(left_out)]
    targets: dict[str, list[float]] = {}
    for record in read_calibrations(options.calibrations):
        targets.setdefault(record["method"], []).append(float(record["target_density"]))
    points, areas = compare_methods(rows, targets, options.density, options.grid, options.length_buckets,
                                    options.tolerance, options.n_resamples, options.confidence, options.seed)  # fmt: skip
    protocol = get_task(options.task).protocol
    for table, path in ((points, options.output_csv), (areas, options.output_auc_csv)):
        with atomic_path(path) as tmp:
            with_protocol = table.copy()
            with_protocol.insert(2, "protocol", protocol)  # after method_a, method_b
            with_protocol.to_csv(tmp, index=False)
    with atomic_path(options.output_md) as tmp:
        tmp.write_text(markdown(points, areas, options.task, options.density, left_out))
    print(points.to_string(index=False))
    return points, areas
