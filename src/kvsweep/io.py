"""Reading JSONL inputs and writing outputs atomically (temp file, then rename)."""

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kvsweep.errors import KvsweepError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A killed job therefore never leaves a file at `path` that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.writelines(json.dumps(record) + "\n" for record in records)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; every line must be an object holding the `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise KvsweepError(f"{path}: no such file")
    records = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise KvsweepError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise KvsweepError(f"{path}, line {lineno}: expected a JSON object")
            missing = [key for key in required if key not in record]
            if missing:
                raise KvsweepError(f"{path}, line {lineno}: missing field(s) {', '.join(missing)}")
            records.append(record)
    return records
