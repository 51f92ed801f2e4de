"""The H2O-versus-KVzap figure: quality against KV density, one curve per method.

    python -m kvsweep.compare --summary summary.csv [--task perplexity|summarization]
        --output-png F.png --output-pdf F.pdf

Left: the quality difference to the baseline (NLL per token, or ROUGE-L points; with its
bootstrap CI) against the fraction of the KV cache kept; right: perplexity or ROUGE-L against the
same. Points are labelled with their thresholds; the baseline is the point at density 1 and a
dashed line.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from kvsweep.errors import KvsweepError, readable_errors
from kvsweep.io import atomic_path

TASK_AXES = {
    # task: (difference column, its label, absolute column, its label)
    "perplexity": ("delta_nll", "ΔNLL vs baseline (nats/token)", "ppl", "perplexity"),
    "summarization": ("delta_rougeL", "ΔROUGE-L vs baseline (points)", "rougeL", "ROUGE-L F1 (LongBench, x100)"),
}


def plot_quality_vs_density(table: pd.DataFrame, title: str, task: str = "perplexity"):
    quality, label, absolute, absolute_label = TASK_AXES[task]
    baseline = table[table.method == "baseline"]
    if baseline.empty:
        raise KvsweepError("the summary has no baseline row")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for method, rows in table[table.method != "baseline"].groupby("method"):
        rows = rows.sort_values("kv_density")
        errors = [rows[quality] - rows[f"{quality}_ci_low"], rows[f"{quality}_ci_high"] - rows[quality]]
        line = left.errorbar(rows.kv_density, rows[quality], yerr=errors, marker="o", capsize=3, label=method)
        right.plot(rows.kv_density, rows[absolute], marker="o", color=line[0].get_color(), label=method)
        for _, row in rows.iterrows():
            for axis, y in ((left, row[quality]), (right, row[absolute])):
                axis.annotate(
                    str(row.threshold), (row.kv_density, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    left.axhline(0, color="black", linestyle="--", linewidth=1)
    left.plot([1.0], [0.0], marker="*", markersize=12, color="black", linestyle="none", label="baseline")
    reference = baseline[absolute].iloc[0]
    right.axhline(reference, color="black", linestyle="--", linewidth=1)
    right.plot([1.0], [reference], marker="*", markersize=12, color="black", linestyle="none", label="baseline")
    left.set(xlabel="KV density (fraction of cache kept)", ylabel=label, title="Quality loss")
    right.set(xlabel="KV density (fraction of cache kept)", ylabel=absolute_label, title=absolute_label.split(" (")[0])
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    return fig


def save_figure(fig, *paths: str) -> None:
    for path in paths:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.rsplit(".", 1)[-1], dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", required=True)
    parser.add_argument("--task", default="perplexity", choices=list(TASK_AXES))
    parser.add_argument("--title", default="H2O vs KVzap: streaming perplexity under KV eviction")
    parser.add_argument("--output-png", required=True)
    parser.add_argument("--output-pdf", required=True)
    args = parser.parse_args(argv)
    with readable_errors("kvsweep.compare"):
        table = pd.read_csv(args.summary, dtype={"threshold": str})
        save_figure(plot_quality_vs_density(table, args.title, args.task), args.output_png, args.output_pdf)


if __name__ == "__main__":
    main()
