"""Reading JSONL inputs and writing outputs atomically (temp file, then rename)."""

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kvsweep.core.errors import KvsweepError


def ensure_parent(path: str | os.PathLike) -> Path:
    """Create the folder of `path` (and its parents); a folder that cannot be made is one message."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KvsweepError(f"cannot create the folder of {path}: {err.strerror or err}") from None
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A killed job therefore never leaves a file at `path` that looks complete. The temporary file
    is created with mode 0666 less the umask, as `open()` would (`tempfile.mkstemp` makes 0600,
    which after the rename left results unreadable to collaborators).
    """
    if Path(path).is_dir():
        raise KvsweepError(f"cannot write {path}: it is a folder (give a file name)")
    path = ensure_parent(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise KvsweepError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside `path` to write a folder into (a model's `save_pretrained`);
    if the block succeeds, its files get the modes `open()` would give them (0666 less the umask:
    safetensors writes 0600, which left weights unreadable to collaborators) and it replaces `path`.
    A killed job leaves only the hidden staging folder, never a `path` that looks complete."""
    path = ensure_parent(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        staging.mkdir()
        yield staging
        mask = current_umask()
        for folder, _, names in os.walk(staging):
            os.chmod(folder, 0o777 & ~mask)
            for name in names:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_lines_atomic(path: str | os.PathLike, lines: Iterable[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    _write_lines_atomic(path, (json.dumps(record) + "\n" for record in records))


def write_json_atomic(path: str | os.PathLike, record: dict) -> None:
    """One JSON object, indented, as the calibration and stage records are written."""
    _write_lines_atomic(path, [json.dumps(record, indent=1) + "\n"])


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; every line must be an object holding the `required` keys."""
    return list(iter_jsonl(path, required))


def iter_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """The records of a JSONL file one by one, each checked as it is read (a reader that stops
    early never reads, nor fails on, the lines after). A UTF-8 byte order mark is allowed."""
    path = Path(path)
    if not path.is_file():
        raise KvsweepError(f"{path}: no such file")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise KvsweepError(
                    f"{path}, line {lineno}: not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
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
            yield record


def record_digests(path: str | os.PathLike) -> Iterator[str]:
    """For each record of a JSONL file (its non-blank lines, as `read_jsonl` numbers them), the
    sha256 of every record up to and including it. What a prepared shard read from its source is
    records 0..i: the digest at i says whether they changed since (`kvsweep.stages.prepare` records it,
    the workflow compares it), whatever was appended after them."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            # Whitespace around a record (and a byte order mark) is no part of it: adding or
            # removing some changes no record that a job read.
            line = (raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw).strip()
            if not line.decode("utf-8", errors="replace").strip():  # as read_jsonl skips them
                continue
            digest.update(line + b"\n")
            yield digest.hexdigest()


def record_digest_at(path: str | os.PathLike, index: int) -> str | None:
    """`record_digests` at record `index` (None: the file is missing or holds fewer records)."""
    try:
        for i, found in enumerate(record_digests(path)):
            if i == index:
                return found
    except OSError:
        return None
    return None


def checked_text(value, source: str, index: int, field: str) -> str:
    """A field's text, which must be a string of valid Unicode (JSON can carry lone surrogates such
    as \\ud800, which no tokenizer takes)."""
    if not isinstance(value, str):
        raise KvsweepError(f"{source}, record {index}: field '{field}' is not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise KvsweepError(
            f"{source}, record {index}: field '{field}' is not valid Unicode text "
            f"(a lone surrogate {value[err.start]!r} at character {err.start})"
        ) from None
    return value
