"""The `kvsweep` command: one sub-command per stage of the workflow, each named as its rule
(`kvsweep evaluate ...`; `python -m kvsweep evaluate ...` is the same). A sub-command's module
(here) defines its arguments and turns them into its stage's options; the stage itself is imported
only when the sub-command runs, so that a job pays for the imports it uses.
"""

import argparse
import importlib
import sys
import time

from kvsweep.core.errors import readable_errors
from kvsweep.core.job import exit_without_teardown, start_job
from kvsweep.core.timing import StageClock

# Sub-command -> its module in kvsweep.cli, in the order `kvsweep --help` lists them.
COMMANDS = (
    "prepare",
    "evaluate",
    "calibrate",
    "score",
    "comparison",
    "figures",
    "protocols",
    "eviction_map",
    "train_surrogate",
    "check_surrogate_documents",
    "demo_assets",
    "config",
    "methods",
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kvsweep", description="KV-cache compression sweeps: one sub-command per stage of the workflow."
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name in COMMANDS:
        module = importlib.import_module(f"kvsweep.cli.{name}")
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
    return top


def main(argv: list[str] | None = None) -> None:
    """Run a sub-command. As a process (`argv` None) a job's clock starts at the process's start,
    it ends with the workflow's shell, and it skips the interpreter's teardown; called in-process
    (with `argv`, as the tests do), its clock starts at the call."""
    as_process = argv is None
    clock = StageClock(start=None if as_process else time.time())
    args = parser().parse_args(sys.argv[1:] if as_process else argv)
    module = importlib.import_module(f"kvsweep.cli.{args.command}")
    program = f"kvsweep {args.command}"
    if module.JOB and as_process:
        start_job(program)
    with readable_errors(program):
        module.run(args, clock)
    if module.JOB and as_process:
        exit_without_teardown()
