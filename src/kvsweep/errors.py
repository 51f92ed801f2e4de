"""User-facing errors: one readable message, no traceback."""

import re
import sys
from contextlib import contextmanager
from pathlib import Path


class KvsweepError(Exception):
    """A problem with the user's input or environment, explained in one message."""


# What the hub accepts as a repository id: `name` or `namespace/name`, letters, digits, - _ . only.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


# Names ending like a data file are local files, never hub ids (`data/reports.jsonl`).
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def names_a_local_path(name: str) -> bool:
    """True if `name` exists on disk or cannot be a hub id (`./x`, `/data/m`, `a/b/c`, `~/m`,
    `data/x.jsonl`): such a name is meant as a local path, and a missing one must not be reported
    as a hub id. (`models/llama` could be either: it counts as a hub id until it exists.)"""
    name = str(name)
    return Path(name).expanduser().exists() or not _HUB_ID.match(name) or name.endswith(_FILE_SUFFIXES)


def missing_local_path(kind: str, name: str) -> KvsweepError | None:
    """The error for a local path that does not exist, else None (a hub id, or an existing path)."""
    if names_a_local_path(name) and not Path(name).expanduser().exists():
        return KvsweepError(f"{kind} '{name}': no such local folder or file")
    return None


def cannot_load(kind: str, name: str, err: Exception, hint: str = "") -> KvsweepError:
    """`kind 'name' could not be loaded as a local folder | hub id ...: first line of err.` + hint
    (a missing local path is found before loading: `missing_local_path`)."""
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
