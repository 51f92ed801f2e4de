"""User-facing errors: one readable message, no traceback."""

import sys
from contextlib import contextmanager
from pathlib import Path


class KvsweepError(Exception):
    """A problem with the user's input or environment, explained in one message."""


def cannot_load(kind: str, name: str, err: Exception, hint: str = "") -> KvsweepError:
    """`kind 'name' could not be loaded as a local folder | hub id ...: first line of err.` + hint"""
    where = "local folder" if Path(name).exists() else "hub id (not in the local Hugging Face cache, or offline)"
    return KvsweepError(f"{kind} '{name}' could not be loaded as a {where}: {str(err).splitlines()[0]}{hint}")


@contextmanager
def readable_errors(program: str):
    """Turn a KvsweepError raised by a command-line entry point into `program: error: ...` and exit 2."""
    try:
        yield
    except KvsweepError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
