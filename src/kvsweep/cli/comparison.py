"""`kvsweep comparison`: method against method at equal KV density (`kvsweep.stages.comparison`)."""

from kvsweep.cli.arguments import add_bootstrap_arguments, add_results_arguments, number, whole
from kvsweep.study.tasks import all_tasks

HELP = "compare the compressed methods with each other at equal KV density, with paired intervals"
JOB = False


def add_arguments(parser) -> None:
    parser.add_argument("--task", default="perplexity", choices=list(all_tasks()))
    add_results_arguments(parser)
    parser.add_argument(
        "--density", default="kv_density_compressible", choices=["kv_density_compressible", "kv_density"]
    )
    parser.add_argument("--grid", type=number(0, 1), nargs="+", default=[round(0.1 * i, 1) for i in range(1, 10)])
    parser.add_argument("--length-buckets", type=whole(1), nargs="*", default=[4096, 8192])
    parser.add_argument("--tolerance", type=number(0, 0.2, high_open=False), default=0.01, help="calibration tolerance: how far below a "
                        "method's lowest density a target may lie and still be compared there")  # fmt: skip
    parser.add_argument("--output-csv", required=True)
    parser.add_argument("--output-auc-csv", required=True)
    parser.add_argument("--output-md", required=True)
    add_bootstrap_arguments(parser)


def run(args, clock) -> None:
    from kvsweep.stages.comparison import ComparisonOptions
    from kvsweep.stages.comparison import run as comparison

    comparison(ComparisonOptions(
        inputs=args.inputs, output_csv=args.output_csv, output_auc_csv=args.output_auc_csv, output_md=args.output_md,
        task=args.task, documents=args.documents, calibrations=args.calibrations, density=args.density,
        grid=args.grid, length_buckets=args.length_buckets, tolerance=args.tolerance, n_resamples=args.n_resamples,
        confidence=args.confidence, seed=args.seed,
    ))  # fmt: skip
