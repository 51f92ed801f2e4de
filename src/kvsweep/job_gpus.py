"""How many GPUs a job computes on (light: the CLIs read it before importing torch)."""

import os

from kvsweep.errors import KvsweepError

# The workflow passes `gpus_per_job` to its jobs in this variable rather than on their command
# lines: Snakemake reruns a job whose command changed, and the GPU count never changes a result.
GPUS_VARIABLE = "KVSWEEP_GPUS_PER_JOB"


def add_gpus_argument(parser) -> None:
    parser.add_argument(
        "--gpus", type=int, default=None,
        help=f"GPUs to split the model over (default: ${GPUS_VARIABLE}, which the workflow sets from gpus_per_job, else 1)",
    )  # fmt: skip


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
