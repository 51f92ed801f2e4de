"""Calibration jobs: a method's probe, and the search for the threshold of one target density
(`kvsweep.analysis.calibration_search`).

A threshold means something different for every method (KVzap: a log-scale surrogate score; H2O: a
mean attention that falls roughly like 1 / position), so a comparison at the same KV budget needs,
for each method, the threshold that reaches a given density on the study's own engine, model,
chunk size and windows. The density is the token-weighted compressible density over the
calibration documents (KV entries kept over entries held in [sinks, n - window), as in the
summary tables); the documents come from the study's source but are disjoint from the evaluated
ones. `probe` streams the documents once without evicting (threshold -inf) and writes the
quantiles of the scores every compressible position had when it was decided; `search` streams
every calibration document once per step, at most `max_steps` steps.
"""

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kvsweep.analysis.calibration_search import QUANTILE_LEVELS, search
from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import write_json_atomic
from kvsweep.core.thresholds import canonical_threshold
from kvsweep.core.timing import StageClock, discard_stage_record
from kvsweep.stages.model_jobs import EngineOptions, build_press, load_engine_model, load_shard, resolve_method
from kvsweep.study.methods import get_method


@dataclass
class ProbeOptions(EngineOptions):
    output: str = ""


@dataclass
class SearchOptions(EngineOptions):
    output: str = ""
    probe: str = ""  # the method's probe.json
    target_density: float = 0.5
    tolerance: float = 0.01
    max_steps: int = 10


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
    def from_options(cls, options: EngineOptions, clock: StageClock | None = None) -> "Calibration":
        clock = clock or StageClock(start=time.time())
        if not get_method(options.method).takes_targets:
            raise KvsweepError(
                f"method '{options.method}' has no threshold along which density falls: nothing to calibrate"
            )
        if options.threshold is not None:
            raise KvsweepError(
                "--threshold: a calibration sets its own (the probe evicts nothing, each search step tries one)"
            )
        options = replace(options, threshold=-math.inf)  # the probe evicts nothing; each search step sets its own
        method, settings = resolve_method(options)
        documents = load_shard(options.data, options.max_length)
        if not documents:
            raise KvsweepError(
                f"{options.data}: no calibration documents (too few documents qualify after the study's)"
            )
        model = load_engine_model(options, clock)
        press = build_press(method, -math.inf, settings, model, clock)
        calibration = cls(model, documents, press, options.chunk_size, options.batch_size, options.graphs, clock)
        calibration.record.update(method=options.method, settings=settings, model=options.model)
        calibration.limits = method.threshold_range
        return calibration

    def stream(self, threshold: float, **stream_options) -> list[dict]:
        from kvsweep.engine.stream_nll import stream_nll

        # Fresh passes for every step: the threshold is part of what a CUDA graph captures.
        self.press.threshold = threshold
        todo = sorted(self.documents, key=lambda d: -len(d["input_ids"]))
        results = []
        for start in range(0, len(todo), self.batch_size):
            batch = [d["input_ids"] for d in todo[start : start + self.batch_size]]
            with self.clock.stage("model_work"):
                results += stream_nll(
                    self.model, batch, self.chunk_size, self.press, cuda_graphs=self.cuda_graphs, clock=self.clock,
                    **stream_options,
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


def probe(options: ProbeOptions, clock: StageClock | None = None) -> dict:
    calibration = Calibration.from_options(options, clock)
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


def calibrate(options: SearchOptions, clock: StageClock | None = None) -> dict:
    if not 0 < options.target_density < 1:
        raise KvsweepError(f"--target-density must lie strictly between 0 and 1, got {options.target_density}")
    probed = read_probe(options.probe)
    calibration = Calibration.from_options(options, clock)
    if probed["documents"] != [d["id"] for d in calibration.documents]:
        raise KvsweepError(f"{options.probe} was made on other calibration documents: run the probe again")
    ours = json.loads(json.dumps({key: calibration.record[key] for key in ("method", "settings", "chunk_size")}))
    for key, value in ours.items():
        if key in probed and probed[key] != value:
            raise KvsweepError(
                f"{options.probe} was made with {key} {probed[key]!r}, this search has {value!r}: give the probe of "
                "this method and settings, or run it again"
            )
    started = time.perf_counter()
    found, steps = search(
        calibration.density,
        np.asarray(probed["quantiles"]),
        options.target_density,
        options.tolerance,
        options.max_steps,
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
        "target_density": options.target_density,
        "tolerance": options.tolerance,
        "threshold": canonical_threshold(found.threshold),
        "density": found.density,
        "steps": [{"threshold": canonical_threshold(s.threshold), "density": s.density} for s in steps],
    }


def run(options: ProbeOptions | SearchOptions, clock: StageClock | None = None) -> dict:
    """The probe (`ProbeOptions`) or the search (`SearchOptions`), written to `options.output` with
    the job's stage record beside it."""
    clock = clock or StageClock(start=time.time())
    discard_stage_record(options.output)
    record = calibrate(options, clock) if isinstance(options, SearchOptions) else probe(options, clock)
    with clock.stage("writing"):
        write_json_atomic(options.output, record)
    clock.save(options.output, documents=len(record["documents"]), batch_size=options.batch_size,
               gpus=options.gpu_count, job="calibration")  # fmt: skip
    return record
