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
        _close_progress_bars()
        print(f"{program}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _close_progress_bars() -> None:
    """Progress bars still open end their line now: the error is then the log's last line, not
    glued to a bar or followed by one."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
