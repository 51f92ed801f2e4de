"""`kvsweep check_surrogate_documents`: a surrogate's documents are none of the study's or the
calibration's (`kvsweep.stages.train_surrogate.check_documents`)."""

HELP = "check that a surrogate's documents are none of those evaluated or calibrated on"
JOB = False


def add_arguments(parser) -> None:
    parser.add_argument("--documents", required=True, help="the surrogate's document list (documents.jsonl)")
    parser.add_argument("--exclude", nargs="+", required=True, help="the study's and the calibration's lists")
    parser.add_argument("--output", required=True)


def run(args, clock) -> None:
    from kvsweep.stages.train_surrogate import check_documents

    check_documents(args.documents, args.exclude, args.output)
