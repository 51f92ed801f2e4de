"""Where a job's wall time goes: start-up, imports, model and surrogate loads, CUDA-graph captures,
the model's work, writing.

A `StageClock` starts at the process's own start (read from the kernel where it can be, so the
interpreter's start-up is counted), and attributes every second of the job to exactly one stage:
stages nest, and an inner stage's time (a graph capture inside the model's work) is taken out of
the outer one. What no stage claims is `other`, so the stages always add up to the wall time. On a
GPU each stage boundary waits for the device, or queued kernels would be billed to the next stage.

The record (`record()`, written next to the job's output, e.g. `shardNNN.jsonl` as
`shardNNN.stages.json`; calibration jobs too) is what the score step adds up over a study. It starts with the process:
on SLURM, what runs before it in the job (Snakemake's job step reading the workflow, a conda
activation) is `launch_s`, where SLURM says when the job started (SLURM_JOB_START_TIME, SLURM >=
23.02), and left out otherwise.
"""

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from kvsweep.core.io import write_json_atomic

# The stages of an evaluation job, in order; `model_work` is what the job is for, the rest is its
# fixed cost.
STAGES = ("startup", "imports", "model_load", "surrogate_load", "graph_capture", "model_work", "writing", "other")
MODEL_WORK = "model_work"


def process_start_time() -> float:
    """The epoch time at which this process started (Linux: its start in clock ticks since boot,
    against the boot clock now; /proc/stat's boot time is whole seconds, too coarse), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        running = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - running
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def launch_seconds(process_start: float) -> float | None:
    """Seconds from the SLURM job's start to this process's, where SLURM tells (else None)."""
    try:
        return max(process_start - float(os.environ["SLURM_JOB_START_TIME"]), 0.0)
    except (KeyError, ValueError):
        return None


class StageClock:
    """Wall seconds per stage of one job. `synchronize` (e.g. torch.cuda.synchronize) is called at
    every stage boundary once set; until then (before torch is imported) boundaries are host-only."""

    def __init__(self, start: float | None = None):
        self.start = process_start_time() if start is None else start
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.synchronize = None
        self._open: list[list] = []  # [stage, since] of the stages entered and not left, innermost last
        self.seconds["startup"] = time.time() - self.start

    def _now(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        return time.time()

    @contextmanager
    def stage(self, name: str):
        """Bill the time inside the block to `name` (not to the stage around it)."""
        if name not in self.seconds:
            raise ValueError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
        now = self._now()
        if self._open:  # pause the outer stage
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([name, now])
        try:
            yield
        finally:
            now = self._now()
            self.seconds[name] += now - self._open.pop()[1]
            if self._open:
                self._open[-1][1] = now

    def record(self, **facts) -> dict:
        """The stages so far, `other` the unclaimed rest, with `wall_s` and the given facts."""
        wall = time.time() - self.start
        seconds = {**self.seconds, "other": 0.0}
        seconds["other"] = max(wall - sum(seconds.values()), 0.0)
        record = {"wall_s": wall, "stages_s": seconds, "model_work_share": seconds[MODEL_WORK] / wall, **facts}
        if (launch := launch_seconds(self.start)) is not None:
            record["launch_s"] = launch
        return record

    def report(self, **facts) -> dict:
        """The record, also said in the log (stderr) as one line per stage."""
        record = self.record(**facts)
        wall = record["wall_s"]
        lines = [f"stages of this job ({wall:.1f} s wall):"]
        lines += [
            f"  {name:<15}{seconds:8.2f} s  {seconds / wall:6.1%}" for name, seconds in record["stages_s"].items()
        ]
        print("\n".join(lines), file=sys.stderr)
        return record

    def save(self, output: str | os.PathLike, **facts) -> dict:
        """The record, said in the log and written (atomically) beside the job's `output`."""
        record = self.report(**facts)
        write_json_atomic(stages_path(output), record)
        return record


def stages_path(output: str | os.PathLike) -> Path:
    """Where the stage record of the job that writes `output` (…/shardNNN.jsonl) lies."""
    output = Path(output)
    return output.with_name(output.stem + ".stages.json")


def discard_stage_record(output: str | os.PathLike) -> None:
    """At a job's start: a record from an earlier attempt would describe another run."""
    stages_path(output).unlink(missing_ok=True)


def read_stage_record(output: str | os.PathLike) -> dict | None:
    """The stage record beside `output`, or None if the job did not write one (or it is unreadable)."""
    try:
        record = json.loads(stages_path(output).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("stages_s"), dict):
        return None
    return record
