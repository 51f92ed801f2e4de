"""`kvsweep protocols`: a task under streaming and under kvpress's protocol, side by side
(`kvsweep.stages.protocols`)."""

HELP = "put a task's streaming summary beside its kvpress-protocol summary: table and figure"
JOB = False


def add_arguments(parser) -> None:
    parser.add_argument("--task", default="perplexity", choices=["perplexity", "summarization"])
    parser.add_argument("--streaming", required=True, help="<task>/summary.csv")
    parser.add_argument("--kvpress", required=True, help="<task>_kvpress/summary.csv")
    parser.add_argument(
        "--density", default="kv_density_compressible", choices=["kv_density_compressible", "kv_density"]
    )
    for output in ("csv", "md", "png", "pdf"):
        parser.add_argument(f"--output-{output}", required=True)


def run(args, clock) -> None:
    from kvsweep.stages.protocols import ProtocolsOptions
    from kvsweep.stages.protocols import run as protocols

    protocols(ProtocolsOptions(streaming=args.streaming, kvpress=args.kvpress, output_csv=args.output_csv,
                               output_md=args.output_md, output_png=args.output_png, output_pdf=args.output_pdf,
                               task=args.task, density=args.density))  # fmt: skip
