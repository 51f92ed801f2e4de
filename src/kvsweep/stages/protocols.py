"""A task under both protocols, side by side (`kvsweep.analysis.protocols`): protocols.csv,
protocols.md and a figure, from the two summaries."""

from dataclasses import dataclass

from kvsweep.analysis.figures import save_figure
from kvsweep.analysis.protocols import markdown, plot_protocols, side_by_side
from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import atomic_path
from kvsweep.stages.figures import read_table
from kvsweep.study.tasks import all_tasks, get_task


@dataclass
class ProtocolsOptions:
    streaming: str  # <task>/summary.csv
    kvpress: str  # <task>_kvpress/summary.csv
    output_csv: str
    output_md: str
    output_png: str
    output_pdf: str
    task: str = "perplexity"
    density: str = "kv_density_compressible"


def run(options: ProtocolsOptions):
    task = get_task(options.task)
    if task.protocol != "streaming" or f"{task.name}_kvpress" not in all_tasks():
        raise KvsweepError(f"--task {task.name}: name a streaming task that has a kvpress-protocol twin")
    columns = ["method", "swept", "value", "target_density", task.quality, task.difference,
               f"{task.difference}_ci_low", f"{task.difference}_ci_high", options.density]  # fmt: skip
    tables = [
        read_table(path, columns, f"a {name} summary.csv", dtype={"value": str, "swept": str})
        for path, name in ((options.streaming, task.name), (options.kvpress, f"{task.name}_kvpress"))
    ]
    table = side_by_side(*tables, task, options.density)
    keys = [{f"{m} {v}" if v == v else m for m, v in zip(t.method, t.value, strict=True)} for t in tables]
    only = {"streaming": sorted(keys[0] - keys[1]), "kvpress": sorted(keys[1] - keys[0])}
    with atomic_path(options.output_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(options.output_md) as tmp:
        tmp.write_text(markdown(table, task, options.density, only))
    figure = plot_protocols(
        table, task, options.density, f"{task.name}: streaming (solid) and kvpress's protocol (dashed)"
    )
    save_figure(figure, options.output_png, options.output_pdf)
    print(table.to_string(index=False))
    return table
