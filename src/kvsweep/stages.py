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

import ctypes
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from kvsweep.io import write_json_atomic

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


# Set by the workflow for its jobs (common.smk's shell prefix): a job then ends with the shell
# that runs it, as a job a scheduler kills must.
DIE_WITH_PARENT = "KVSWEEP_DIE_WITH_PARENT"


def die_with_parent() -> None:
    """When run by the workflow (`DIE_WITH_PARENT` set), ask Linux to end this process with SIGTERM
    once its parent (the rule's shell) is gone, and make SIGTERM a normal exit (unfinished atomic
    writes then remove their temporary files). Without it, killing a job's shell left the Python
    process running; its output then appeared after Snakemake had marked the job failed."""
    if os.environ.get(DIE_WITH_PARENT) != "1":
        return
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent was gone before the request
        sys.exit(128 + signal.SIGTERM)


def start_job(program: str) -> None:
    """What every job command does first: end with the workflow's shell (`die_with_parent`), and
    refuse, in one line, a library that would stop transformers at import."""
    from kvsweep.compatibility import check_kernels_package
    from kvsweep.errors import readable_errors

    die_with_parent()
    with readable_errors(program):
        check_kernels_package()


def exit_without_teardown() -> None:
    """End a job that has written and synced its files: skip the interpreter's teardown, which
    takes about a second with torch, transformers and kvpress loaded (a fixed cost of every job).
    Only for a command's `__main__`, never for code called in-process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def study_costs(jobs: dict[str, list[str]]) -> tuple["pd.DataFrame", list[str]]:  # noqa: F821
    """The stage records of the jobs that wrote each group's outputs (e.g. {"evaluation": [...],
    "calibration": [...]}), added up per group and stage, and over all groups: seconds, share of
    the jobs' wall time, GPU-seconds (seconds x the job's GPUs) and mean per job. Also one line
    per group saying how many jobs it covers and what share of their time was fixed cost."""
    import pandas as pd

    groups = {name: [r for output in outputs if (r := read_stage_record(output)) is not None]
              for name, outputs in jobs.items()}  # fmt: skip
    groups["all"] = [record for records in groups.values() for record in records]
    tables, lines = [], []
    for name, records in groups.items():
        table = _stage_table(records).assign(jobs=name)
        tables.append(table)
        wall, work = table.seconds.iloc[-1], table.set_index("stage").seconds[MODEL_WORK]
        if not records:
            lines.append(f"{name} jobs: no stage records")
            continue
        line = (
            f"{name} jobs ({len(records)}): {wall:.0f} s of wall time ({table.gpu_seconds.iloc[-1]:.0f} GPU-seconds); "
            f"{work / wall:.0%} model work, {1 - work / wall:.0%} fixed cost ({(wall - work) / len(records):.1f} s per job)"
        )
        launches = [r["launch_s"] for r in records if "launch_s" in r]
        if launches:
            line += f"; SLURM's job launch before the processes: {sum(launches):.0f} s more"
        missing = len(jobs[name]) - len(records) if name in jobs else 0
        if missing:
            line += f"; {missing} job(s) without a stage record (run before kvsweep recorded stages) left out"
        lines.append(line)
    table = pd.concat(tables, ignore_index=True)
    return table[["jobs", "stage", "seconds", "share", "gpu_seconds", "per_job_s"]], lines


def _stage_table(records: list[dict]) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd

    rows = []
    for name in (*STAGES, "wall"):
        seconds = [r["wall_s"] if name == "wall" else float(r["stages_s"].get(name, 0.0)) for r in records]
        gpu = sum(s * int(r.get("gpus", 0)) for s, r in zip(seconds, records, strict=True))
        rows.append({"stage": name, "seconds": sum(seconds), "gpu_seconds": gpu,
                     "per_job_s": sum(seconds) / len(records) if records else float("nan")})  # fmt: skip
    table = pd.DataFrame(rows)
    wall = table.seconds.iloc[-1]
    return table.assign(share=table.seconds / wall if wall else float("nan"))
