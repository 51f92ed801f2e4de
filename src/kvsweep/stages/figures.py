"""The figure of a task: quality against KV density, one curve per method, with the pairwise
differences of comparison.csv (`kvsweep.analysis.figures`)."""

from dataclasses import dataclass

import pandas as pd

from kvsweep.analysis.figures import plot_quality_vs_density, save_figure
from kvsweep.analysis.results import curve_names
from kvsweep.core.errors import KvsweepError
from kvsweep.study.tasks import get_task


@dataclass
class FiguresOptions:
    summary: str
    output_png: str
    output_pdf: str
    comparison: str | None = None  # comparison.csv: adds the pairwise panel
    task: str = "perplexity"
    density: str = "kv_density_compressible"
    title: str = "H2O vs KVzap: streaming perplexity under KV eviction"


def read_table(path: str, columns: list[str], what: str, **read_options) -> pd.DataFrame:
    """A CSV that must hold `columns` (one message naming the file otherwise)."""
    try:
        table = pd.read_csv(path, **read_options)
    except FileNotFoundError:
        raise KvsweepError(f"{path}: no such file") from None
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise KvsweepError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise KvsweepError(f"{path}: not {what} (no column {', '.join(missing)})")
    return table


def run(options: FiguresOptions) -> None:
    task = get_task(options.task)
    quality = [task.difference, f"{task.difference}_ci_low", f"{task.difference}_ci_high", task.quality]
    table = read_table(options.summary, ["method", "value", options.density, *quality], f"a {task.name} summary.csv",
                       dtype={"value": str})  # fmt: skip
    table["method"] = curve_names(table)  # a method's compression ratios: a line of their own
    comparison = None
    if options.comparison:
        columns = ["method_a", "method_b", "length_bucket", "density", "difference", "difference_ci_low",
                   "difference_ci_high"]  # fmt: skip
        comparison = read_table(options.comparison, columns, "a comparison.csv")
    figure = plot_quality_vs_density(table, options.title, options.task, comparison, options.density)
    save_figure(figure, options.output_png, options.output_pdf)
