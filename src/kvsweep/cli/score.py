"""`kvsweep score`: a task's summary table, one row per method and swept value (`kvsweep.stages.score`)."""

from kvsweep.cli.arguments import add_bootstrap_arguments, add_results_arguments, swept_pairs
from kvsweep.study.tasks import all_tasks

HELP = "score evaluation results: quality, KV densities and the paired difference to the baseline"
JOB = False


def add_arguments(parser) -> None:
    parser.add_argument("--task", default="perplexity", choices=list(all_tasks()))
    add_results_arguments(parser)
    parser.add_argument("--output-csv", required=True)
    parser.add_argument("--output-md", required=True)
    parser.add_argument("--output-provenance", help="CSV: per configuration, the code, libraries and device used")
    parser.add_argument("--output-costs", help="CSV: the model jobs' wall time per stage (evaluations, calibrations)")
    parser.add_argument("--output-costs-md", help="the same as Markdown, with the study's share of fixed cost")
    parser.add_argument(
        "--surrogate-training", help="the folder of a KVzap surrogate the study trained (its job's costs)"
    )
    parser.add_argument(
        "--swept", nargs="*", default=[], help="METHOD=SETTING for a method that sweeps a setting, not a threshold"
    )
    add_bootstrap_arguments(parser)


def run(args, clock) -> None:
    from kvsweep.stages.score import ScoreOptions
    from kvsweep.stages.score import run as score

    score(ScoreOptions(
        inputs=args.inputs, output_csv=args.output_csv, output_md=args.output_md, task=args.task,
        documents=args.documents, calibrations=args.calibrations, output_provenance=args.output_provenance,
        output_costs=args.output_costs, output_costs_md=args.output_costs_md,
        surrogate_training=args.surrogate_training, swept=swept_pairs(args.swept), n_resamples=args.n_resamples,
        confidence=args.confidence, seed=args.seed,
    ))  # fmt: skip
