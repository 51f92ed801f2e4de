"""The calibration's share of the GPU time of the shipped study, on an 8B-shaped model.

    python benchmarks/calibration_share.py --arch llama-3.1-8b --output results.json [--budget-s 500]

The shipped study (config.yaml): 100 documents of 8,192 tokens in 10 shards, chunk 128, batch 8;
baseline, and kvzap_no_sink / kvzap / h2o at 9 target densities each plus their explicit
thresholds (2, 2 and 1); calibration on 8 further documents. This script runs kvsweep's own
calibration (`kvsweep.stages.calibrate.Calibration` and `search`, the code the calibration jobs run) for
every (method, target) of the study on a random-weight model of the architecture, with random
token documents, and times one evaluation shard of each method the same way (`stream_nll` over
10 documents in batches of 8, what an evaluation job's model work is). The share is

    calibration GPU-seconds / (calibration + evaluation GPU-seconds)

over the whole study, model work only (the fixed cost of starting a job is the same for every job
and is reported beside it, from the number of jobs). Random weights and random tokens give other
score distributions than a trained model on GovReport, so the number of search steps here is an
indication, not a measurement of the real study; the time per step is real. Results are written
after every measurement, so a run cut short keeps what it measured.
"""

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

from kvsweep.engine.stream_nll import stream_nll
from kvsweep.stages.calibrate import Calibration, search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import build_model, kvsweep_press  # noqa: E402
from gpu_throughput import timed as gpu_timed  # noqa: E402

TARGETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# method -> (window, sinks, explicit thresholds of the shipped study)
STUDY = {"kvzap_no_sink": (128, 0, 2), "kvzap": (128, 4, 2), "h2o": (512, 0, 1)}


def press_for(method, surrogate):
    window, sinks, _ = STUDY[method]
    press = kvsweep_press("h2o" if method == "h2o" else "kvzap", surrogate, -math.inf, window)
    press.sinks = sinks
    return press


def timed(fn):
    """gpu_throughput's timer, without the peak memory."""
    return gpu_timed(fn)[:2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--output", required=True)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--calibration-documents", type=int, default=8)
    parser.add_argument("--study-documents", type=int, default=100)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    parser.add_argument("--budget-s", type=float, default=500)
    args = parser.parse_args()
    started = time.perf_counter()

    model, surrogate = build_model(args.arch)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def documents(n, prefix):
        return [{"id": f"{prefix}{i}", "input_ids": torch.randint(0, vocab, (args.length,), generator=generator).tolist()}
                for i in range(n)]  # fmt: skip

    calibration_docs = documents(args.calibration_documents, "cal")
    shard = [d["input_ids"] for d in documents(args.shard_size, "doc")]
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "arch": args.arch,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "evaluation_shard_s": {},
        "calibration": {},
    }

    def save():
        Path(args.output).write_text(json.dumps(report, indent=1))

    # One evaluation shard of each method (10 documents: a batch of 8, then 2), at a threshold in
    # the middle of the range (the eviction's cost does not depend much on how much it evicts).
    def evaluate_shard(method, threshold):
        press = None if method == "baseline" else press_for(method, surrogate)
        if press is not None:
            press.threshold = threshold
        for start in range(0, len(shard), args.batch):
            stream_nll(model, shard[start : start + args.batch], args.chunk, press)

    stream_nll(model, shard[:1], args.chunk)  # warm-up: kernels, allocator
    middle = {"kvzap_no_sink": -6.0, "kvzap": -6.0, "h2o": 1e-3}
    for method in ["baseline", *STUDY]:
        _, seconds = timed(lambda m=method: evaluate_shard(m, middle.get(m, 0.0)))
        report["evaluation_shard_s"][method] = seconds
        print(f"evaluation shard, {method}: {seconds:.1f} s", flush=True)
        save()

    for method in STUDY:
        calibration = Calibration(model, calibration_docs, press_for(method, surrogate), args.chunk, args.batch)
        (quantiles, count), probe_s = timed(calibration.probe_quantiles)
        entry = report["calibration"][method] = {"probe_s": probe_s, "n_scores": count, "targets": {}}
        print(f"{method}: probe {probe_s:.1f} s, scores {quantiles[0]:.3g} .. {quantiles[-1]:.3g}", flush=True)
        save()
        for target in args.targets:
            if time.perf_counter() - started > args.budget_s:
                entry["cut_by_budget"] = True
                break
            steps_s = []

            def measure(threshold, calibration=calibration, steps_s=steps_s):
                density, seconds = timed(lambda: calibration.density(threshold))
                steps_s.append(seconds)
                return density

            try:
                found, steps = search(measure, quantiles, target, args.tolerance, args.max_steps, log=lambda line: None)
                outcome = {"threshold": found.threshold, "density": found.density, "reached": True}
            except Exception as err:  # noqa: BLE001 (an unreachable target is a result here)
                outcome = {"reached": False, "error": str(err)[:300]}
            entry["targets"][str(target)] = {**outcome, "steps": len(steps_s), "seconds": sum(steps_s)}
            print(f"{method} {target}: {len(steps_s)} steps, {sum(steps_s):.1f} s, {outcome}", flush=True)
            save()

    summarize(report, args)
    save()
    print(json.dumps(report["share"], indent=1))


def summarize(report: dict, args) -> None:
    """The study's GPU-seconds of model work: evaluations and calibrations, and the share."""
    shards = math.ceil(args.study_documents / args.shard_size)
    evaluation = shards * report["evaluation_shard_s"]["baseline"]
    calibration = 0.0
    for method, (_, _, explicit) in STUDY.items():
        evaluation += shards * (len(TARGETS) + explicit) * report["evaluation_shard_s"][method]
        entry = report["calibration"].get(method, {})
        measured = list(entry.get("targets", {}).values())
        if measured:  # targets cut by the time budget count at the mean of the measured ones
            per_target = sum(t["seconds"] for t in measured) / len(measured)
            calibration += entry["probe_s"] + per_target * len(TARGETS)
    steps = [t["steps"] for entry in report["calibration"].values() for t in entry["targets"].values()]
    jobs = {"evaluation": shards * (1 + sum(len(TARGETS) + e for _, _, e in STUDY.values())),
            "calibration": len(STUDY) * (1 + len(TARGETS))}  # fmt: skip
    report["share"] = {
        "evaluation_gpu_s": evaluation,
        "calibration_gpu_s": calibration,
        "calibration_share": calibration / (calibration + evaluation),
        "mean_steps_per_target": sum(steps) / len(steps) if steps else None,
        "max_steps": max(steps) if steps else None,
        "targets_measured": len(steps),
        "jobs": jobs,
    }


if __name__ == "__main__":
    main()
