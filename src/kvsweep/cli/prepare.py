"""`kvsweep prepare`: load documents, tokenize, truncate, skip short ones, shard (`kvsweep.stages.prepare`)."""

from kvsweep.cli.arguments import whole
from kvsweep.study.tasks import all_tasks

HELP = "load documents, tokenize, truncate, skip short ones, and write each task's shards"
JOB = True


def add_arguments(parser) -> None:
    parser.add_argument("--source", required=True, help="hub dataset id, local folder of data files, or local .jsonl")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--subset", help="the dataset's configuration name, e.g. gov_report in a LongBench copy")
    parser.add_argument("--text-field", default="report")
    parser.add_argument("--summary-field", default="summary", help="reference summary (text or list of texts)")
    parser.add_argument("--id-field")
    parser.add_argument("--tokenizer", required=True, help="hub id or folder of the model whose tokenizer to use")
    parser.add_argument("--max-documents", type=whole(1), required=True)
    parser.add_argument("--max-length", type=whole(2), required=True)
    parser.add_argument("--min-length", type=whole(2), default=2)
    parser.add_argument("--shard-size", type=whole(1), required=True)
    parser.add_argument(
        "--skip-documents", type=whole(0), default=0,
        help="leave out the first N qualifying documents (calibration documents follow the study's)",
    )  # fmt: skip
    parser.add_argument("--shard", type=whole(0), help="write only this shard (0-based) and its document list")
    parser.add_argument("--tasks", nargs="+", default=["perplexity"], choices=list(all_tasks()))
    parser.add_argument("--output-dir", required=True)


def run(args, clock) -> None:
    from kvsweep.stages.prepare import PrepareOptions
    from kvsweep.stages.prepare import run as prepare

    prepare(PrepareOptions(
        source=args.source, tokenizer=args.tokenizer, max_documents=args.max_documents, max_length=args.max_length,
        shard_size=args.shard_size, output_dir=args.output_dir, split=args.split, subset=args.subset,
        text_field=args.text_field, summary_field=args.summary_field, id_field=args.id_field,
        min_length=args.min_length, skip_documents=args.skip_documents, shard=args.shard, tasks=args.tasks,
    ))  # fmt: skip
