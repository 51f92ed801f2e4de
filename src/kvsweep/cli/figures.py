"""`kvsweep figures`: quality against KV density, one curve per method (`kvsweep.stages.figures`)."""

from kvsweep.study.tasks import all_tasks

HELP = "draw quality against KV density, one curve per method, and the pairwise differences"
JOB = False


def add_arguments(parser) -> None:
    parser.add_argument("--summary", required=True)
    parser.add_argument("--comparison", help="comparison.csv of `kvsweep comparison`: adds the pairwise panel")
    parser.add_argument(
        "--density", default="kv_density_compressible", choices=["kv_density_compressible", "kv_density"]
    )
    parser.add_argument("--task", default="perplexity", choices=list(all_tasks()))
    parser.add_argument("--title", default="H2O vs KVzap: streaming perplexity under KV eviction")
    parser.add_argument("--output-png", required=True)
    parser.add_argument("--output-pdf", required=True)


def run(args, clock) -> None:
    from kvsweep.stages.figures import FiguresOptions
    from kvsweep.stages.figures import run as figures

    figures(FiguresOptions(summary=args.summary, output_png=args.output_png, output_pdf=args.output_pdf,
                           comparison=args.comparison, task=args.task, density=args.density, title=args.title))  # fmt: skip
