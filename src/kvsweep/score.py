"""Score evaluation results: one row per (method, swept value).

    python -m kvsweep.score [--task perplexity|summarization]
        --inputs results/RUN/TASK/METHOD/VALUE/shardNNN.jsonl ... [--swept streaming_llm=sliding_window]
        --output-csv summary.csv --output-md summary.md [--n-resamples 2000 --confidence 0.95 --seed 0]

Each input's method and swept value (a threshold, or the setting `--swept` names) are read from
its path. What a row holds is the task's (`kvsweep.tasks`: perplexity and the paired NLL
difference to `baseline`; summarization: ROUGE and the paired ROUGE-L difference), with the
token-weighted KV densities. Differences come with a percentile bootstrap confidence interval
over documents (scipy.stats.bootstrap, paired), from the helpers here.
"""

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from kvsweep.config import check_bootstrap
from kvsweep.errors import KvsweepError, readable_errors
from kvsweep.io import atomic_path
from kvsweep.results import load_results, read_calibrations
from kvsweep.stages import study_costs
from kvsweep.tasks import all_tasks, get_task


def bootstrap_interval(
    samples: tuple, statistic, n_resamples: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    """The statistic over documents and its paired percentile bootstrap interval (NaN for < 2 documents)."""
    value = float(statistic(*samples))
    if len(samples[0]) < 2:
        return value, math.nan, math.nan
    result = stats.bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return value, float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_delta(nll: np.ndarray, base: np.ndarray, count: np.ndarray, n_resamples: int, confidence: float, seed: int):
    """Mean per-token NLL difference to the baseline over the same documents, with a bootstrap CI."""

    def statistic(a, b, n, axis=-1):
        return (a.sum(axis=axis) - b.sum(axis=axis)) / n.sum(axis=axis)

    return bootstrap_interval((nll, base, count), statistic, n_resamples, confidence, seed)


def paired_mean_difference(values: np.ndarray, base: np.ndarray, n_resamples: int, confidence: float, seed: int):
    """Mean per-document difference to the baseline, with a bootstrap CI."""

    def statistic(a, b, axis=-1):
        return (a - b).mean(axis=axis)

    return bootstrap_interval((values, base), statistic, n_resamples, confidence, seed)


def baseline_of(rows: pd.DataFrame, baseline: pd.DataFrame, label: str = "") -> pd.DataFrame:
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


def configurations(results: pd.DataFrame):
    """(method, swept value, its documents, the baseline's rows for the same documents)."""
    baseline = results[results.method == "baseline"].set_index("id")
    for (method, value), group in results.groupby(["method", results.value.fillna("")], sort=False):
        yield method, value, group, baseline_of(group, baseline, f"{method} at {value}: ")


def densities(group: pd.DataFrame) -> dict:
    compressible = group.kv_total_compressible.sum()
    return {
        "kv_density": group.kv_kept.sum() / group.kv_total.sum(),
        "kv_density_compressible": group.kv_kept_compressible.sum() / compressible if compressible else math.nan,
    }


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Baseline first, then by method and numeric value."""
    order = table.value.map(lambda t: float(t) if t else -math.inf)
    table = table.assign(_base=table.method != "baseline", _t=order).sort_values(["_base", "method", "_t"])
    return table.drop(columns=["_base", "_t"]).reset_index(drop=True)


def add_targets(table: pd.DataFrame, calibrations: list[str]) -> pd.DataFrame:
    """The target density each calibrated threshold was found for (several, if two targets landed
    on one threshold); empty for explicit thresholds. `kv_density_compressible` is what it reached."""
    found: dict[tuple[str, str], list[str]] = {}
    for record in read_calibrations(calibrations):
        found.setdefault((record["method"], record["threshold"]), []).append(f"{record['target_density']:g}")
    targets = [";".join(found.get((m, t), [])) for m, t in zip(table.method, table.value, strict=True)]
    return table.assign(target_density=targets)


PROVENANCE_FIELDS = ["kvsweep", "torch", "transformers", "kvpress", "device", "dtype"]


def provenance_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per (method, swept value): what its documents were computed with, and how many each way."""
    if "provenance" not in results:
        return pd.DataFrame(columns=["method", "value", *PROVENANCE_FIELDS, "n_docs"])
    fields = pd.DataFrame([p if isinstance(p, dict) else {} for p in results.provenance], index=results.index)
    fields = fields.reindex(columns=PROVENANCE_FIELDS).fillna("unrecorded")
    table = pd.concat([results[["method"]], results.value.fillna(""), fields], axis=1)
    counts = table.groupby(list(table.columns), sort=False).size().rename("n_docs").reset_index()
    return ordered(counts)


def add_documents_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--documents", nargs="*", default=[],
        help="the prepared shards' document lists (data/<task>/shardNNN.documents.jsonl): each result shard must "
        "hold exactly the documents of its prepared shard",
    )  # fmt: skip


def add_swept_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--swept", nargs="*", default=[], help="METHOD=SETTING for a method that sweeps a setting, not a threshold"
    )


def swept_of(args) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in args.swept]
    if any(len(pair) != 2 for pair in pairs):
        raise KvsweepError(f"--swept takes METHOD=SETTING pairs, got {args.swept}")
    return dict(pairs)


def write_tables(table: pd.DataFrame, csv_path: str, md_path: str) -> None:
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="perplexity", choices=list(all_tasks()))
    parser.add_argument("--inputs", nargs="+", required=True)
    add_documents_argument(parser)
    parser.add_argument("--output-csv", required=True)
    parser.add_argument("--output-md", required=True)
    parser.add_argument("--calibrations", nargs="*", default=[], help="calibration JSONs: the target of each threshold")
    parser.add_argument("--output-provenance", help="CSV: per configuration, the code, libraries and device used")
    parser.add_argument("--output-costs", help="CSV: the model jobs' wall time per stage (evaluations, calibrations)")
    parser.add_argument(
        "--surrogate-training", help="the folder of a KVzap surrogate the study trained (its job's costs)"
    )
    parser.add_argument("--output-costs-md", help="the same as Markdown, with the study's share of fixed cost")
    add_swept_argument(parser)
    parser.add_argument("--n-resamples", type=int, default=2000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with readable_errors("kvsweep.score"):
        check_bootstrap(args.n_resamples, args.confidence, args.seed)
        scorer = get_task(args.task).summarize
        results = load_results(args.inputs, args.task, swept_of(args), args.documents)
        table = add_targets(scorer(results, args.n_resamples, args.confidence, args.seed), args.calibrations)
        write_tables(table, args.output_csv, args.output_md)
        if args.output_provenance:
            with atomic_path(args.output_provenance) as tmp:
                provenance_table(results).to_csv(tmp, index=False)
        if args.output_costs:
            # The calibration jobs: each target's search, and each method's probe beside them.
            probes = sorted({str(Path(path).with_name("probe.json")) for path in args.calibrations})
            jobs = {"evaluation": args.inputs, "calibration": [*args.calibrations, *probes]}
            if args.surrogate_training:
                jobs["surrogate training"] = [args.surrogate_training]
            write_costs(jobs, args.output_costs, args.output_costs_md)
        print(table.to_string(index=False))


def write_costs(jobs: dict[str, list[str]], csv_path: str, md_path: str | None = None) -> None:
    """Where the model jobs' time went (their stage records), per kind of job, as CSV and Markdown."""
    costs, lines = study_costs(jobs)
    with atomic_path(csv_path) as tmp:
        costs.to_csv(tmp, index=False)
    sections = [f"{line}\n\n{costs[costs.jobs == name].drop(columns='jobs').to_markdown(index=False, floatfmt='.3g')}"
                for name, line in zip(costs.jobs.unique(), lines, strict=True)]  # fmt: skip
    with atomic_path(md_path or Path(csv_path).with_suffix(".md")) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
