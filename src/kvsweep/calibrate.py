"""Calibration: the threshold at which a method keeps a target share of the compressible KV cache.

    python -m kvsweep.calibrate probe [engine arguments as for kvsweep.evaluate] --output probe.json
    python -m kvsweep.calibrate search [engine arguments] --probe probe.json --target-density 0.3
        [--tolerance 0.01 --max-steps 10] --output 0.3.json

A threshold means something different for every method (KVzap: a log-scale surrogate score; H2O: a
mean attention that falls roughly like 1 / position), so a comparison at the same KV budget needs,
for each method, the threshold that reaches a given density on the study's own engine, model,
chunk size and windows. The density is the token-weighted compressible density over the
calibration documents (KV entries kept over entries held in [sinks, n - window), as in the
summary tables); the documents come from the study's source but are disjoint from the evaluated
ones.

`probe` streams the documents once without evicting (threshold -inf) and writes the quantiles of
the scores every compressible position had when it was decided. `search` maps the quantile level
p to a threshold (p = 1 - target would be exact if eviction did not change later scores; it does)
and searches p, deterministically: secant steps from the probe's guess until the target is
bracketed, then regula falsi on the logit of the density (Illinois) with bisection as a fallback.
Every threshold tried is rounded to 4 significant digits (more where the scores' spread is small
next to their size), so that a recalibration that lands on the same value names the same
evaluation path. Each step streams every calibration document once; at most `max_steps` steps.
A target that cannot be reached within the tolerance (the density jumps over it, or even the
largest threshold keeps more) stops with the closest threshold found and its density.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvsweep.errors import KvsweepError, readable_errors
from kvsweep.evaluate import (
    add_engine_arguments,
    build_press,
    cuda_graphs_setting,
    gpu_count,
    load_engine_model,
    load_shard,
    resolve_method,
)
from kvsweep.io import write_json_atomic
from kvsweep.methods import get_method
from kvsweep.stages import StageClock, discard_stage_record, exit_without_teardown, start_job
from kvsweep.thresholds import canonical_threshold

QUANTILE_LEVELS = 1001  # probe quantiles at p = 0, 0.001, ..., 1
SIGNIFICANT_DIGITS = 4


def rounded(threshold: float, spread: float = 0.0) -> float:
    """`threshold` to 4 significant digits, or finer where the scores' spread is small next to their
    size (KVzap-like scores of -12 +- 0.01 need more than 4 digits to be told apart): at least 5
    digits below the spread's leading one."""
    digits = SIGNIFICANT_DIGITS
    if threshold and spread > 0:
        digits = max(digits, math.floor(math.log10(abs(threshold))) - math.floor(math.log10(spread)) + 5)
    return float(f"{threshold:.{digits}g}")


def threshold_at(quantiles: np.ndarray, level: float) -> float:
    """The threshold of quantile level p in [0, 2]: the probe's score quantile for p <= 1, and
    beyond the largest score a linear continuation (p = 2 lies one score range above it), for
    methods whose scores rise once others are evicted (H2O's attention is renormalized)."""
    if level <= 1.0:
        return float(np.interp(level, np.linspace(0.0, 1.0, len(quantiles)), quantiles))
    span = max(float(quantiles[-1] - quantiles[0]), abs(float(quantiles[-1])), 1e-12)
    return float(quantiles[-1]) + (level - 1.0) * span


@dataclass
class Step:
    level: float
    threshold: float
    density: float


def _logit(density: float) -> float:
    density = min(max(density, 1e-6), 1 - 1e-6)
    return math.log(density / (1 - density))


def search(
    measure, quantiles: np.ndarray, target: float, tolerance: float, max_steps: int, log=print,
    limits: tuple[float, float] = (-math.inf, math.inf),
):  # fmt: skip
    """Find a threshold whose density is within `tolerance` of `target`. `measure(threshold)`
    returns the density; it is assumed to fall (weakly) as the threshold rises. Every threshold
    tried lies within `limits` (the method's `threshold_range`). Returns (the step that reached the
    target, every step); raises KvsweepError naming the closest otherwise.

    Until the target is bracketed: secant steps in quantile level (the first with slope 1, which
    corrects a constant offset between the probe and the real density exactly). Once bracketed:
    regula falsi on the logit of the density (the Illinois variant, which halves the weight of an
    end kept twice), and bisection when that would not shrink the bracket."""
    steps: list[Step] = []
    seen: dict[float, float] = {}
    low: Step | None = None  # a step with density above the target
    high: Step | None = None  # a step with density below it
    kept_side, weight = None, 1.0
    level = min(max(1.0 - target, 0.0), 1.0)
    why = f"no threshold within {max_steps} steps"
    spread = float(quantiles[-1] - quantiles[0])
    for index in range(max_steps):
        threshold = min(max(rounded(threshold_at(quantiles, level), spread), limits[0]), limits[1])
        # A bracket narrower than a tenth of the probe's quantile spacing (in level, so that it is
        # relative to how the scores are distributed, not to their range), with the target still
        # outside: the density jumps over it (many positions share a score).
        narrow = low is not None and high is not None and high.level - low.level < 0.1 / (len(quantiles) - 1)
        if threshold in seen and threshold in limits:
            end = "highest" if threshold == limits[1] else "lowest"
            why = f"the search reached the {end} threshold of the method's range ({canonical_threshold(threshold)})"
            break
        if threshold in seen or narrow:
            why = "the density jumps over the target between neighbouring thresholds"
            break
        density = seen[threshold] = measure(threshold)
        step = Step(level, threshold, density)
        steps.append(step)
        log(
            f"step {index + 1}: threshold {canonical_threshold(threshold)} -> compressible density {density:.4f} "
            f"(target {target} +- {tolerance})"
        )
        if abs(density - target) <= tolerance:
            return step, steps
        side = "low" if density > target else "high"
        if side == "low":
            low = step if low is None or step.level > low.level else low
        else:
            high = step if high is None or step.level < high.level else high
        if low is None or high is None:
            if side == "low" and level >= 2.0:
                why = "even a threshold above every score keeps more"
                break
            if side == "high" and level <= 0.0:
                why = "even a threshold below every score evicts more"
                break
            slope = 1.0
            if len(steps) > 1 and steps[-2].level != level:
                slope = (steps[-2].density - density) / (level - steps[-2].level)
                slope = min(max(slope, 0.2), 5.0)
            level = min(max(level + (density - target) / slope, 0.0), 2.0)
            continue
        weight = weight / 2 if kept_side == ("high" if side == "low" else "low") else 1.0
        kept_side = "high" if side == "low" else "low"
        f_low, f_high = _logit(low.density) - _logit(target), _logit(high.density) - _logit(target)
        if kept_side == "high":
            f_high *= weight
        else:
            f_low *= weight
        level = low.level + f_low * (high.level - low.level) / (f_low - f_high)
        margin = 0.05 * (high.level - low.level)
        if not low.level + margin < level < high.level - margin:
            level = (low.level + high.level) / 2
    if low is not None and high is not None:
        why += (
            f" (it falls from {low.density:.4f} at {canonical_threshold(low.threshold)} to {high.density:.4f} at "
            f"{canonical_threshold(high.threshold)})"
        )
    closest = min(steps, key=lambda s: abs(s.density - target))
    seen_text = ", ".join(f"{canonical_threshold(s.threshold)} -> {s.density:.4f}" for s in steps)
    raise KvsweepError(
        f"target density {target} cannot be reached within {tolerance}: {why}. Closest: threshold "
        f"{canonical_threshold(closest.threshold)} with density {closest.density:.4f} (tried: {seen_text}). "
        "Remove the target, or widen calibration.tolerance"
    )


class Calibration:
    """The study's engine on the calibration documents: every step streams all documents through
    one press (its threshold set per step), in batches, as an evaluation job would."""

    def __init__(
        self, model, documents: list[dict], press, chunk_size: int, batch_size: int, cuda_graphs=None, clock=None
    ):
        self.model, self.documents, self.press = model, documents, press
        self.chunk_size, self.batch_size, self.cuda_graphs = chunk_size, batch_size, cuda_graphs
        self.clock = clock or StageClock(start=time.time())
        self.record = {"chunk_size": chunk_size, "documents": [d["id"] for d in documents]}
        self.limits = (-math.inf, math.inf)  # the thresholds the method takes

    @classmethod
    def from_args(cls, args, clock: StageClock | None = None) -> "Calibration":
        clock = clock or StageClock(start=time.time())
        if not get_method(args.method).takes_targets:
            raise KvsweepError(
                f"method '{args.method}' has no threshold along which density falls: nothing to calibrate"
            )
        args.threshold = -math.inf  # the probe evicts nothing; each search step sets its own
        method, settings = resolve_method(args)
        documents = load_shard(args.data, args.max_length)
        if not documents:
            raise KvsweepError(f"{args.data}: no calibration documents (too few documents qualify after the study's)")
        model = load_engine_model(args, clock)
        press = build_press(method, -math.inf, settings, model, clock)
        calibration = cls(model, documents, press, args.chunk_size, args.batch_size, cuda_graphs_setting(args), clock)
        calibration.record.update(method=args.method, settings=settings, model=args.model)
        calibration.limits = method.threshold_range
        return calibration

    def stream(self, threshold: float, **options) -> list[dict]:
        from kvsweep.stream_nll import stream_nll

        # Fresh passes for every step: the threshold is part of what a CUDA graph captures.
        self.press.threshold = threshold
        todo = sorted(self.documents, key=lambda d: -len(d["input_ids"]))
        results = []
        for start in range(0, len(todo), self.batch_size):
            batch = [d["input_ids"] for d in todo[start : start + self.batch_size]]
            with self.clock.stage("model_work"):
                results += stream_nll(
                    self.model, batch, self.chunk_size, self.press, cuda_graphs=self.cuda_graphs, clock=self.clock,
                    **options,
                )  # fmt: skip
        return results

    def density(self, threshold: float) -> float:
        """Token-weighted compressible density over the documents at `threshold`."""
        results = self.stream(threshold)
        total = sum(r["kv_total_compressible"] for r in results)
        return sum(r["kv_kept_compressible"] for r in results) / total if total else 1.0

    def probe_quantiles(self) -> tuple[np.ndarray, int]:
        """Quantiles of the scores every compressible position had when decided, nothing evicted."""
        self.press.record_decisions = True
        try:
            results = self.stream(-math.inf, return_decision_scores=True)
        finally:
            self.press.record_decisions = False
        scores = np.concatenate([r["decision_scores"].ravel() for r in results]).astype(np.float64)
        scores = scores[np.isfinite(scores)]
        if scores.size == 0:
            raise KvsweepError("the calibration documents have no compressible positions (shorter than sinks + window)")
        return np.quantile(scores, np.linspace(0.0, 1.0, QUANTILE_LEVELS)), int(scores.size)


def probe(args, clock: StageClock | None = None) -> dict:
    calibration = Calibration.from_args(args, clock)
    quantiles, count = calibration.probe_quantiles()
    print(
        f"probe: {count} decisions on {len(calibration.documents)} documents; scores from {quantiles[0]:.4g} "
        f"to {quantiles[-1]:.4g}, median {quantiles[QUANTILE_LEVELS // 2]:.4g}",
        file=sys.stderr,
    )
    return {**calibration.record, "n_scores": count, "quantiles": quantiles.tolist()}


def read_probe(path: str) -> dict:
    """A probe's record (`probe`), checked: one readable message for a missing, cut or foreign file."""
    try:
        probed = json.loads(Path(path).read_text())
    except OSError as err:
        raise KvsweepError(f"probe {path}: {err.strerror or err} (run the probe first)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KvsweepError(
            f"probe {path}: not a whole JSON record ({err}); delete it and run the probe again"
        ) from None
    missing = [key for key in ("documents", "quantiles") if not isinstance(probed, dict) or key not in probed]
    if missing or len(probed["quantiles"]) < 2:
        what = f"no {', '.join(missing)}" if missing else "fewer than two quantiles"
        raise KvsweepError(f"probe {path}: not a probe record ({what}); run the probe again")
    return probed


def calibrate(args, clock: StageClock | None = None) -> dict:
    if not 0 < args.target_density < 1:
        raise KvsweepError(f"--target-density must lie strictly between 0 and 1, got {args.target_density}")
    probed = read_probe(args.probe)
    calibration = Calibration.from_args(args, clock)
    if probed["documents"] != [d["id"] for d in calibration.documents]:
        raise KvsweepError(f"{args.probe} was made on other calibration documents: run the probe again")
    started = time.perf_counter()
    found, steps = search(
        calibration.density,
        np.asarray(probed["quantiles"]),
        args.target_density,
        args.tolerance,
        args.max_steps,
        log=lambda line: print(line, file=sys.stderr),
        limits=calibration.limits,
    )
    print(
        f"calibrated: threshold {canonical_threshold(found.threshold)} gives density {found.density:.4f} "
        f"after {len(steps)} steps ({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return {
        **calibration.record,
        "target_density": args.target_density,
        "tolerance": args.tolerance,
        "threshold": canonical_threshold(found.threshold),
        "density": found.density,
        "steps": [{"threshold": canonical_threshold(s.threshold), "density": s.density} for s in steps],
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.calibrate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    probe_parser = commands.add_parser("probe", help="score quantiles of a run that evicts nothing")
    search_parser = commands.add_parser("search", help="the threshold that reaches a target density")
    for sub in (probe_parser, search_parser):
        add_engine_arguments(sub)
        sub.add_argument("--output", required=True)
    search_parser.add_argument("--probe", required=True, help="the method's probe.json")
    search_parser.add_argument("--target-density", type=float, required=True)
    search_parser.add_argument("--tolerance", type=float, default=0.01)
    search_parser.add_argument("--max-steps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.threshold is not None:
        parser.error("--threshold: a calibration sets its own (the probe evicts nothing, each search step tries one)")
    return args


def main(argv=None):
    # As a command the stages start at the process's start; called in-process, at the call.
    clock = StageClock(start=None if argv is None else time.time())
    args = parse_args(argv)
    with readable_errors("kvsweep.calibrate"):
        discard_stage_record(args.output)
        record = probe(args, clock) if args.command == "probe" else calibrate(args, clock)
        with clock.stage("writing"):
            write_json_atomic(args.output, record)
        clock.save(args.output, documents=len(record["documents"]), batch_size=args.batch_size,
                   gpus=gpu_count(args), job="calibration")  # fmt: skip


if __name__ == "__main__":
    start_job("kvsweep.calibrate")
    main()
    exit_without_teardown()
