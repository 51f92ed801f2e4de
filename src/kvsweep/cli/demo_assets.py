"""`kvsweep demo_assets`: the CPU demo's reports and bundled model (`kvsweep.stages.demo_assets`)."""

from kvsweep.cli.arguments import whole

HELP = "write the CPU demo's reports and its bundled model (or train that model again: --train-model)"
JOB = True


def add_arguments(parser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output-dir", help="write the demo's reports and the bundled model here")
    target.add_argument("--train-model", metavar="DIR", help="train the demo model and its tokenizer into DIR")
    parser.add_argument(
        "--documents", type=whole(1), default=48, help="reports of the demo (the bundled tokenizer knows 48)"
    )
    parser.add_argument("--train-steps", type=whole(1), default=600)
    parser.add_argument("--seed", type=whole(0), default=0)


def run(args, clock) -> None:
    from kvsweep.stages.demo_assets import DemoAssetsOptions
    from kvsweep.stages.demo_assets import run as demo_assets

    demo_assets(DemoAssetsOptions(output_dir=args.output_dir, train_model=args.train_model, documents=args.documents,
                                  train_steps=args.train_steps, seed=args.seed))  # fmt: skip
