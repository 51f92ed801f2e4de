"""Score evaluation results: one row per (method, swept value), as CSV and Markdown.

Each input's method and swept value (a threshold, or the setting `swept` names) are read from its
path. What a row holds is the task's (perplexity and the paired NLL difference to `baseline`;
summarization: ROUGE and the paired ROUGE-L difference), with the token-weighted KV densities;
differences come with a paired percentile bootstrap interval over documents. Also, where asked:
what each configuration's documents were computed with (provenance), and where the model jobs'
time went (their stage records, per kind of job).
"""

from dataclasses import dataclass, field
from pathlib import Path

from kvsweep.analysis.costs import write_costs
from kvsweep.analysis.results import load_results
from kvsweep.analysis.summary import add_protocol, add_targets, provenance_table, write_tables
from kvsweep.core.io import atomic_path
from kvsweep.study.config import check_bootstrap
from kvsweep.tasks import work_of


@dataclass
class ScoreOptions:
    inputs: list[str]
    output_csv: str
    output_md: str
    task: str = "perplexity"
    documents: list[str] = field(default_factory=list)  # the prepared shards' document lists
    calibrations: list[str] = field(default_factory=list)
    output_provenance: str | None = None
    output_costs: str | None = None
    output_costs_md: str | None = None
    surrogate_training: str | None = None  # the folder of a surrogate the study trained (its job's costs)
    swept: dict[str, str] = field(default_factory=dict)  # method -> the setting it sweeps
    n_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0


def run(options: ScoreOptions):
    check_bootstrap(options.n_resamples, options.confidence, options.seed)
    work = work_of(options.task)
    results = load_results(options.inputs, options.task, options.swept, options.documents)
    table = work.summarize(results, options.n_resamples, options.confidence, options.seed)
    table = add_protocol(add_targets(table, options.calibrations), work.task.protocol)
    write_tables(table, options.output_csv, options.output_md)
    if options.output_provenance:
        with atomic_path(options.output_provenance) as tmp:
            provenance_table(results, work.task.protocol).to_csv(tmp, index=False)
    if options.output_costs:
        # The calibration jobs: each target's search, and each method's probe beside them.
        probes = sorted({str(Path(path).with_name("probe.json")) for path in options.calibrations})
        jobs = {"evaluation": options.inputs, "calibration": [*options.calibrations, *probes]}
        if options.surrogate_training:
            jobs["surrogate training"] = [options.surrogate_training]
        write_costs(jobs, options.output_costs, options.output_costs_md)
    print(table.to_string(index=False))
    return table
