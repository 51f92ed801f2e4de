"""The H2O-versus-KVzap figure: quality against KV density, one curve per method.

    python -m kvsweep.compare --summary summary.csv [--comparison comparison.csv]
        [--task perplexity|summarization] [--density kv_density_compressible|kv_density]
        --output-png F.png --output-pdf F.pdf

Left: the quality difference to the baseline (NLL per token, or ROUGE-L points; with its
bootstrap CI) against the KV density; middle: perplexity or ROUGE-L against the same; right (with
--comparison): the difference between each pair of methods at common densities, with its paired
CI. Points are labelled with their swept values (thresholds, or windows); the baseline is the point at density 1 and a
dashed line.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from kvsweep.errors import KvsweepError, readable_errors
from kvsweep.io import atomic_path
from kvsweep.tasks import all_tasks, get_task

# The pairwise panel shows the first pairs of comparison.csv (H2O against KVzap first); every pair
# is in the table.
MAX_PAIRS = 6

DENSITY_LABELS = {
    "kv_density_compressible": "compressible KV density (kept / evictable)",
    "kv_density": "KV density (fraction of cache kept)",
}


def plot_quality_vs_density(
    table: pd.DataFrame,
    title: str,
    task: str = "perplexity",
    comparison: pd.DataFrame | None = None,
    density: str = "kv_density_compressible",
):
    """Quality loss and quality against density per method; with `comparison`, a third panel:
    the difference between each pair of methods (all documents) against the same density."""
    spec = get_task(task)
    quality, label, absolute, absolute_label = spec.difference, spec.difference_label, spec.quality, spec.quality_label
    baseline = table[table.method == "baseline"]
    if baseline.empty:
        raise KvsweepError("the summary has no baseline row")
    panels = 3 if comparison is not None and not comparison.empty else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), constrained_layout=True)
    left, right = axes[0], axes[1]
    for method, rows in table[table.method != "baseline"].groupby("method"):
        rows = rows.sort_values(density)
        (line,) = left.plot(rows[density], rows[quality], marker="o", label=method)
        # The interval as drawn from its ends: a percentile bootstrap interval need not contain its
        # point estimate (error bars relative to the point would be negative there).
        left.vlines(rows[density], rows[f"{quality}_ci_low"], rows[f"{quality}_ci_high"], color=line.get_color())
        right.plot(rows[density], rows[absolute], marker="o", color=line.get_color(), label=method)
        for _, row in rows.iterrows():
            for axis, y in ((left, row[quality]), (right, row[absolute])):
                axis.annotate(str(row.value), (row[density], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    left.axhline(0, color="black", linestyle="--", linewidth=1)
    left.plot([1.0], [0.0], marker="*", markersize=12, color="black", linestyle="none", label="baseline")
    reference = baseline[absolute].iloc[0]
    right.axhline(reference, color="black", linestyle="--", linewidth=1)
    right.plot([1.0], [reference], marker="*", markersize=12, color="black", linestyle="none", label="baseline")
    left.set(xlabel=DENSITY_LABELS[density], ylabel=label, title="Quality loss")
    right.set(xlabel=DENSITY_LABELS[density], ylabel=absolute_label, title=absolute_label.split(" (")[0])
    if panels == 3:
        plot_pairwise_differences(axes[2], comparison, task, density)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_pairwise_differences(axis, comparison: pd.DataFrame, task: str, density: str) -> None:
    """method_a's loss minus method_b's at common densities (all documents), with the paired
    bootstrap interval: below 0, method_a loses less."""
    unit = get_task(task).loss_unit
    pairs = list(comparison[comparison.length_bucket == "all"].groupby(["method_a", "method_b"], sort=False))
    for (a, b), rows in pairs[:MAX_PAIRS]:
        (line,) = axis.plot(rows.density, rows.difference, marker="o", label=f"{a} - {b}")
        axis.vlines(rows.density, rows.difference_ci_low, rows.difference_ci_high, color=line.get_color())
    axis.axhline(0, color="black", linestyle="--", linewidth=1)
    shown = "Method against method" + (f" (first {MAX_PAIRS} of {len(pairs)} pairs)" if len(pairs) > MAX_PAIRS else "")
    axis.set(xlabel=DENSITY_LABELS[density], ylabel=f"loss of a - loss of b ({unit})", title=shown)


def save_figure(fig, *paths: str) -> None:
    for path in paths:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.rsplit(".", 1)[-1], dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", required=True)
    parser.add_argument("--comparison", help="comparison.csv of kvsweep.comparison: adds the pairwise panel")
    parser.add_argument("--density", default="kv_density_compressible", choices=list(DENSITY_LABELS))
    parser.add_argument("--task", default="perplexity", choices=list(all_tasks()))
    parser.add_argument("--title", default="H2O vs KVzap: streaming perplexity under KV eviction")
    parser.add_argument("--output-png", required=True)
    parser.add_argument("--output-pdf", required=True)
    args = parser.parse_args(argv)
    with readable_errors("kvsweep.compare"):
        table = pd.read_csv(args.summary, dtype={"value": str})
        comparison = pd.read_csv(args.comparison) if args.comparison else None
        figure = plot_quality_vs_density(table, args.title, args.task, comparison, args.density)
        save_figure(figure, args.output_png, args.output_pdf)


if __name__ == "__main__":
    main()
