"""The same methods under the two protocols, side by side: each configuration's quality loss and
KV density when the input streams through the evicting cache (`<task>/summary.csv`) and when it
is prefilled whole and compressed once, as kvpress does (`<task>_kvpress/summary.csv`). The gap
between the two is what a reader of kvpress-protocol numbers should expect of streaming."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from kvsweep.analysis.figures import DENSITY_LABELS
from kvsweep.study.tasks import Task

PROTOCOLS = ("streaming", "kvpress")


def side_by_side(streaming: pd.DataFrame, kvpress: pd.DataFrame, task: Task, density: str) -> pd.DataFrame:
    """One row per (method, swept, value) that both summaries hold: per protocol the quality, its
    difference to that protocol's baseline with the CI, and the density; then `gap`, the kvpress
    difference minus the streaming one."""
    keys = ["method", "swept", "value"]
    kept = [task.quality, task.difference, f"{task.difference}_ci_low", f"{task.difference}_ci_high", density]
    tables = []
    for name, table in zip(PROTOCOLS, (streaming, kvpress), strict=True):
        table = table[[*keys, "target_density", *kept]].copy()
        table[["swept", "value"]] = table[["swept", "value"]].fillna("")  # the baseline's
        tables.append(table.rename(columns={column: f"{name}_{column}" for column in kept}))
    joined = tables[0].merge(tables[1].drop(columns="target_density"), on=keys, how="inner")
    joined["gap"] = joined[f"kvpress_{task.difference}"] - joined[f"streaming_{task.difference}"]
    return joined


def markdown(table: pd.DataFrame, task: Task, density: str, only: dict[str, list[str]]) -> str:
    """The table as Markdown, each difference with its interval in one cell."""
    shown = table[["method", "swept", "value", "target_density"]].copy()
    for name in PROTOCOLS:
        difference = table[f"{name}_{task.difference}"]
        low, high = table[f"{name}_{task.difference}_ci_low"], table[f"{name}_{task.difference}_ci_high"]
        shown[f"{name} {task.difference} [CI]"] = [
            f"{d:.4g} [{lo:.4g}, {hi:.4g}]" for d, lo, hi in zip(difference, low, high, strict=True)
        ]
        shown[f"{name} {density}"] = table[f"{name}_{density}"]
    shown["gap"] = table["gap"]
    lines = [
        f"# {task.name}: streaming against kvpress's protocol",
        "",
        f"Per configuration, {task.difference_label} and {density} in each protocol, each against its own "
        f"baseline (`{task.name}/summary.csv`, `{task.name}_kvpress/summary.csv`); `gap` = kvpress's "
        f"{task.difference} minus streaming's (no interval of its own). A target density's threshold is "
        "calibrated by streaming: under kvpress's protocol the same threshold keeps another share.",
        "",
        shown.to_markdown(index=False, floatfmt=".4g"),
    ]
    if task.name == "perplexity":
        lines += ["", "Streaming's ΔNLL is over every predicted token of each report, kvpress's over its last "
                  "`continuation_tokens` only: the gap mixes the protocol with which tokens are scored."]  # fmt: skip
    for name, configurations in only.items():
        if configurations:
            lines += ["", f"Only in the {name} summary (not compared): {', '.join(configurations)}"]
    return "\n".join(lines) + "\n"


def plot_protocols(table: pd.DataFrame, task: Task, density: str, title: str):
    """Quality loss against density per method: solid streaming, dashed kvpress's protocol."""
    fig, axis = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    for method, rows in table.groupby("method"):
        if method == "baseline":
            continue
        color = None
        for name, style in zip(PROTOCOLS, ("-", "--"), strict=True):
            rows = rows.sort_values(f"{name}_{density}")
            (line,) = axis.plot(rows[f"{name}_{density}"], rows[f"{name}_{task.difference}"], marker="o",
                                linestyle=style, color=color, label=f"{method} ({name})")  # fmt: skip
            color = line.get_color()
            axis.vlines(rows[f"{name}_{density}"], rows[f"{name}_{task.difference}_ci_low"],
                        rows[f"{name}_{task.difference}_ci_high"], color=color, alpha=0.6)  # fmt: skip
    axis.axhline(0, color="black", linestyle=":", linewidth=1)
    axis.plot([1.0], [0.0], marker="*", markersize=12, color="black", linestyle="none", label="baseline")
    axis.set(xlabel=DENSITY_LABELS[density], ylabel=task.difference_label, title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return fig
