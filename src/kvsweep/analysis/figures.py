"""The figures of a study: quality against KV density, one curve per method (the H2O-versus-KVzap
figure), and where each method evicts (an eviction map).

Quality against density. Left: the quality difference to the baseline (NLL per token, or ROUGE-L points; with its
bootstrap CI) against the KV density; middle: perplexity or ROUGE-L against the same; right (with
a comparison table): the difference between each pair of methods at common densities, with its paired
CI; then, where the summary records them, the quality difference against the KV memory and against
the decoding speed, each as a share of the baseline's (what the compression buys). Points are
labelled with their swept values (thresholds, or windows); the baseline is the point at density 1
and a dashed line.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import atomic_path
from kvsweep.study.tasks import get_task

# The pairwise panel shows the first pairs of comparison.csv (H2O against KVzap first); every pair
# is in the table.
MAX_PAIRS = 6

DENSITY_LABELS = {
    "kv_density_compressible": "compressible KV density (kept / evictable)",
    "kv_density": "KV density (fraction of cache kept)",
}


# What a configuration buys, as a share of the baseline's (summary.csv, `kvsweep.analysis.results.costs`).
COST_LABELS = {
    "kv_memory_vs_baseline": "KV cache memory (share of the baseline's)",
    "decode_vs_baseline": "decoding speed (tokens/s, share of the baseline's)",
}
COST_TITLES = {
    "kv_memory_vs_baseline": "Quality loss against memory",
    "decode_vs_baseline": "Quality loss against speed",
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
    pairwise = comparison is not None and not comparison.empty
    costs = [column for column in COST_LABELS if column in table and table[column].notna().any()]
    panels = 2 + pairwise + len(costs)
    columns = min(panels, 3)
    lines = -(-panels // columns)
    fig, grid = plt.subplots(lines, columns, figsize=(6 * columns, 4.8 * lines), constrained_layout=True, squeeze=False)
    axes = list(grid.flat)
    for unused in axes[panels:]:
        unused.remove()
    axes = axes[:panels]
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
    if pairwise:
        plot_pairwise_differences(axes[2], comparison, task, density)
    for axis, column in zip(axes[2 + pairwise :], costs, strict=True):
        plot_loss_against_cost(axis, table, column, quality, label)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_loss_against_cost(axis, table: pd.DataFrame, cost: str, quality: str, label: str) -> None:
    """Each method's quality loss against what it costs beside the baseline (its KV memory, or its
    decoding speed, as a share of the baseline's): the baseline at 1, loss 0."""
    for method, rows in table[table.method != "baseline"].groupby("method"):
        rows = rows.dropna(subset=[cost]).sort_values(cost)
        if not rows.empty:
            axis.plot(rows[cost], rows[quality], marker="o", label=method)
    axis.axhline(0, color="black", linestyle="--", linewidth=1)
    axis.plot([1.0], [0.0], marker="*", markersize=12, color="black", linestyle="none", label="baseline")
    axis.set(xlabel=COST_LABELS[cost], ylabel=label, title=COST_TITLES[cost])


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


def plot_eviction_map(evicted, title: str, sinks: int, window: int):
    """evicted: bool array (layers, KV heads, positions)."""
    kept_fraction = 1.0 - evicted.mean(axis=1)
    n_layers, n_positions = kept_fraction.shape
    fig, axis = plt.subplots(figsize=(12, 1.2 + 0.25 * n_layers), constrained_layout=True)
    image = axis.imshow(kept_fraction, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    if sinks:
        axis.axvline(sinks - 0.5, color="red", linewidth=1, label=f"sinks ({sinks})")
    if window:
        axis.axvline(n_positions - window - 0.5, color="white", linestyle="--", linewidth=1, label=f"window ({window})")
    axis.set(xlabel="position in the document", ylabel="layer", title=title)
    if sinks or window:
        axis.legend(loc="upper left", fontsize=7)
    fig.colorbar(image, ax=axis, label="share of KV heads keeping")
    return fig
