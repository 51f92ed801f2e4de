"""`kvsweep eviction_map`: where a method evicts, on one document (`kvsweep.stages.eviction_map`)."""

from kvsweep.cli.arguments import add_engine_arguments, engine_options

HELP = "draw, for one document and per layer, the share of KV heads keeping each position"
JOB = True


def add_arguments(parser) -> None:
    add_engine_arguments(parser)
    parser.add_argument(
        "--calibration", help="take the threshold a calibration found (its record) instead of --threshold"
    )
    parser.add_argument("--output-png", required=True)
    parser.add_argument("--output-pdf", required=True)


def run(args, clock) -> None:
    from kvsweep.stages.eviction_map import EvictionMapOptions
    from kvsweep.stages.eviction_map import run as eviction_map

    eviction_map(EvictionMapOptions(**engine_options(args), output_png=args.output_png, output_pdf=args.output_pdf,
                                    calibration=args.calibration), clock)  # fmt: skip
