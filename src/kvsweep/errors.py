"""User-facing errors: one readable message, no traceback."""

import sys
from contextlib import contextmanager


class KvsweepError(Exception):
    """A problem with the user's input or environment, explained in one message."""


@contextmanager
def readable_errors(program: str):
    """Turn a KvsweepError raised by a command-line entry point into `program: error: ...` and exit 2."""
    try:
        yield
    except KvsweepError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
