"""Names of models, surrogates and data: a local path or a hub id, and one spelling per local path."""

import os
import re
from pathlib import Path

from kvsweep.core.errors import KvsweepError

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


# What a local folder must hold to be loaded as each kind (one of the files listed).
FOLDER_FILES = {
    "model": ("config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt"),
    "surrogate": ("config.json",),
}


def incomplete_local_folder(kind: str, name: str) -> KvsweepError | None:
    """The error for an existing local folder that cannot be a `kind` ("model", "tokenizer",
    "surrogate": none of `FOLDER_FILES[kind]` in it) or a file where a folder is needed, else None."""
    path = Path(name).expanduser()
    if not names_a_local_path(name) or not path.exists():
        return None
    if not path.is_dir():
        return KvsweepError(
            f"{kind} '{name}': a file, not a folder ({kind}s are folders, as save_pretrained writes them)"
        )
    if not any((path / file).exists() for file in FOLDER_FILES[kind]):
        return KvsweepError(
            f"{kind} '{name}': the folder holds no {' or '.join(FOLDER_FILES[kind])}; is it the folder "
            "save_pretrained wrote?"
        )
    return None


def cannot_load(kind: str, name: str, err: Exception, hint: str = "") -> KvsweepError:
    """`kind 'name' could not be loaded as a local folder | hub id ...: first line of err.` + hint
    (a missing local path is found before loading: `missing_local_path`)."""
    where = "local folder" if Path(name).exists() else "hub id (not in the local Hugging Face cache, or offline)"
    return KvsweepError(f"{kind} '{name}' could not be loaded as a {where}: {str(err).splitlines()[0]}{hint}")


def canonical_local_path(name: str) -> str:
    """One spelling per existing local folder or file, so that `./m`, `m` and `/work/study/m` name
    the same model and rerun nothing: relative to the working directory below it, absolute
    elsewhere (links are kept as written). Anything else (a hub id, a path not made yet) is
    returned as it is."""
    if not os.path.exists(os.path.expanduser(name)):  # a hub id, or a missing path reported as written
        return name
    path = os.path.abspath(os.path.expanduser(name))
    inside = os.path.relpath(path)
    return path if inside == os.pardir or inside.startswith(os.pardir + os.sep) else inside
