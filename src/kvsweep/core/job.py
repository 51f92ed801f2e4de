"""A job's process: how many GPUs it computes on (read before torch is imported), how it starts
(ending with the workflow's shell, refusing a library that breaks transformers) and how it ends."""

import ctypes
import os
import signal
import sys

from kvsweep.core.compatibility import check_kernels_package
from kvsweep.core.errors import KvsweepError, readable_errors

# The workflow passes `gpus_per_job` to its jobs in this variable rather than on their command
# lines: Snakemake reruns a job whose command changed, and the GPU count never changes a result.
GPUS_VARIABLE = "KVSWEEP_GPUS_PER_JOB"


def job_gpus(device: str, gpus: int | None) -> int:
    """The GPUs a job computes on: 0 on the CPU; else `gpus`, or the workflow's variable, or 1."""
    if device == "cpu":
        return 0
    if gpus is None:
        value = os.environ.get(GPUS_VARIABLE) or "1"
        if not value.isdigit():
            raise KvsweepError(f"{GPUS_VARIABLE} must be a whole number of GPUs, got '{value}'")
        gpus = int(value)
    return max(gpus, 1)


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
