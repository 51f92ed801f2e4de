"""`kvsweep evaluate`: one shard under one method and its swept value (`kvsweep.stages.evaluate`)."""

from kvsweep.cli.arguments import add_engine_arguments, engine_options, number, whole
from kvsweep.core.errors import KvsweepError
from kvsweep.study.tasks import all_tasks, get_task, task_settings

HELP = (
    "evaluate one shard under one method at one threshold (or window): perplexity or summarization, streaming or "
    "in kvpress's protocol"
)
JOB = True


def add_arguments(parser) -> None:
    add_engine_arguments(parser, chunk_required=False)
    parser.add_argument("--task", default="perplexity", choices=list(all_tasks()))
    for setting in task_settings().values():  # each task's own settings, from its declaration
        parser.add_argument(setting.flag, type=setting.parse, default=setting.default, help=setting.help)
    parser.add_argument(
        "--compression-ratio", type=number(0, 1, low_open=False),
        help="kvpress's budget instead of --threshold (tasks in kvpress's protocol): the share of the context "
        "evicted, as the method's kvpress press evicts it (a scorer's: per KV head, lowest scores first; "
        "streaming_llm: the oldest after the sinks; kvzip: over every layer and head at once)",
    )  # fmt: skip
    parser.add_argument(
        "--adaptive-safeguard", type=number(0, 1, low_open=False, high_open=False),
        help="with --compression-ratio: AdaKV's budget (kvpress AdaKVPress), shared by a layer's heads, each keeping "
        "at least this share of its own (kvpress's default: 0.2)",
    )  # fmt: skip
    parser.add_argument(
        "--prefill-batch-size", type=whole(0), default=0,
        help="kvpress's protocol, compacting: contexts prefilled at a time, each group compacted before the next, so "
        "the answers of a larger --batch-size decode together in the memory one group's whole cache takes "
        "(0: the whole batch; same results)",
    )  # fmt: skip
    parser.add_argument("--output", required=True)


def options_of(args):
    """The `EvaluateOptions` of parsed arguments."""
    from kvsweep.stages.evaluate import EvaluateOptions

    task = get_task(args.task)
    task_values = {s.name: getattr(args, s.name) for s in task.settings}
    if args.chunk_size is None:
        if task.protocol != "kvpress":
            raise KvsweepError(f"--chunk-size is needed: task {task.name} streams its input in chunks")
        args.chunk_size = args.max_length  # one pass for the context, as the workflow's jobs give it
    return EvaluateOptions(**engine_options(args), output=args.output, task=args.task, task_settings=task_values,
                           compression_ratio=args.compression_ratio,
                           adaptive_safeguard=args.adaptive_safeguard,
                           prefill_batch_size=args.prefill_batch_size)  # fmt: skip


def run(args, clock) -> None:
    from kvsweep.stages.evaluate import run as evaluate

    evaluate(options_of(args), clock)
