"""`kvsweep calibrate probe|search`: the threshold of a target density (`kvsweep.stages.calibrate`)."""

from kvsweep.cli.arguments import add_engine_arguments, engine_options, number, whole

HELP = "calibrate a method: its probe (score quantiles, nothing evicted), or the search for one target density"
JOB = True


def add_arguments(parser) -> None:
    commands = parser.add_subparsers(dest="calibration", required=True)
    probe = commands.add_parser("probe", help="score quantiles of a run that evicts nothing")
    search = commands.add_parser("search", help="the threshold that reaches a target density")
    for sub in (probe, search):
        add_engine_arguments(sub)  # (--threshold is refused: a calibration sets its own)
        sub.add_argument("--output", required=True)
    search.add_argument("--probe", required=True, help="the method's probe.json")
    search.add_argument("--target-density", type=number(0, 1), required=True)
    search.add_argument("--tolerance", type=number(0, 0.2, high_open=False), default=0.01)
    search.add_argument("--max-steps", type=whole(2, 50), default=10)


def run(args, clock) -> None:
    from kvsweep.stages.calibrate import ProbeOptions, SearchOptions
    from kvsweep.stages.calibrate import run as calibrate

    if args.calibration == "probe":
        options = ProbeOptions(**engine_options(args), output=args.output)
    else:
        options = SearchOptions(**engine_options(args), output=args.output, probe=args.probe,
                                target_density=args.target_density, tolerance=args.tolerance,
                                max_steps=args.max_steps)  # fmt: skip
    calibrate(options, clock)
