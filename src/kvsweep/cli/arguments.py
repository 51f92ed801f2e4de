"""Arguments several sub-commands share, and their conversion to the stages' options."""

import argparse
import math

from kvsweep.core.errors import KvsweepError
from kvsweep.core.job import GPUS_VARIABLE
from kvsweep.study.methods import all_settings


def whole(minimum: int, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def number(low: float, high: float, low_open: bool = True, high_open: bool = True):
    """An argparse type: a finite number between `low` and `high` (open or closed at each end)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text}")
        return value

    return parse


def add_engine_arguments(parser: argparse.ArgumentParser, threshold: bool = True, chunk_required: bool = True) -> None:
    """The model, the data and the method of a job that runs the model (evaluate, calibrate,
    eviction_map): `kvsweep.stages.model_jobs.EngineOptions`. Without `chunk_required` the command
    gives the chunk size itself where --chunk-size is left out."""
    parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    parser.add_argument("--data", required=True, help="shard: JSONL of {id, input_ids}")
    parser.add_argument("--method", required=True, help="a method of `kvsweep methods`")
    if threshold:
        parser.add_argument(
            "--threshold", type=float,
            help="eviction threshold (not for baseline or streaming_llm, whose sweep is --sliding-window); -inf evicts nothing",
        )  # fmt: skip
    # One flag per method setting, from the methods' declarations; a method refuses settings it lacks.
    for setting in all_settings().values():
        parser.add_argument(setting.flag, type=setting.parse, help=f"{setting.help} (default: the method's)")
    parser.add_argument(
        "--chunk-size", type=whole(1), required=chunk_required,
        help="tokens a pass streams into the cache" + ("" if chunk_required else
             " (a task in kvpress's protocol reads its context in one pass: not needed there)"),
    )  # fmt: skip
    parser.add_argument(
        "--max-length", type=whole(2), required=True, help="documents are truncated to this many tokens"
    )
    parser.add_argument("--batch-size", type=whole(1), default=1)
    parser.add_argument("--device", default="cpu")
    add_gpus_argument(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--cuda-graphs", choices=["auto", "off"], default="auto",
        help="auto: on a GPU, replay each pass shape as a CUDA graph; off: run every pass eagerly (same results)",
    )  # fmt: skip


def engine_options(args: argparse.Namespace) -> dict:
    """The `EngineOptions` fields of parsed engine arguments."""
    return {
        "model": args.model, "data": args.data, "method": args.method, "chunk_size": args.chunk_size,
        "max_length": args.max_length, "threshold": getattr(args, "threshold", None),
        "settings": {name: getattr(args, name) for name in all_settings() if getattr(args, name) is not None},
        "batch_size": args.batch_size, "device": args.device, "gpus": args.gpus, "dtype": args.dtype,
        "cuda_graphs": args.cuda_graphs,
    }  # fmt: skip


def add_gpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", type=whole(0), default=None,
        help=f"GPUs to split the model over (default: ${GPUS_VARIABLE}, which the workflow sets from gpus_per_job, else 1)",
    )  # fmt: skip


def add_bootstrap_arguments(parser: argparse.ArgumentParser) -> None:
    # The config schema's bounds (`bootstrap`), checked again by `check_bootstrap`.
    parser.add_argument("--n-resamples", type=whole(100), default=2000)
    parser.add_argument("--confidence", type=number(0, 1), default=0.95)
    parser.add_argument("--seed", type=whole(0, 2**32 - 1), default=0)


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation results a table is made of, and what they are checked against."""
    parser.add_argument("--inputs", nargs="+", required=True, help="results: <task>/<method>/<value>/shardNNN.jsonl")
    parser.add_argument(
        "--documents", nargs="*", default=[],
        help="the prepared shards' document lists (data/<task>/shardNNN.documents.jsonl): each result shard must "
        "hold exactly the documents of its prepared shard",
    )  # fmt: skip
    parser.add_argument(
        "--calibrations", nargs="*", default=[], help="calibration records: the target of each threshold"
    )


def swept_pairs(values: list[str]) -> dict[str, str]:
    """METHOD=SETTING pairs: the methods that sweep a setting rather than a threshold."""
    pairs = [item.split("=", 1) for item in values]
    if any(len(pair) != 2 for pair in pairs):
        raise KvsweepError(f"--swept takes METHOD=SETTING pairs, got {values}")
    return dict(pairs)
