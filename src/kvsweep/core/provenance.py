"""What a result was made from: the identity of model and surrogate weights, of input files, and of
the code (the model's environment, with torch: `kvsweep.engine.models.environment`).

A checkpoint may only be resumed by a job that would compute the same results, so its fingerprint
holds these identities, not only names: a model folder retrained in place, or a hub model whose
cached snapshot moved to a new revision, is another model.
"""

import functools
import hashlib
import os
from pathlib import Path

# Files up to this size are hashed whole (configs, tokenizers, small surrogates); larger ones (the
# weights of an 8B model: 16 GB) by size, modification time and their first and last MiB, which a
# rewrite of the weights changes, at a cost that does not grow with the model.
WHOLE_FILE_LIMIT = 64 << 20
EDGE = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content (whole, or for a large file its size, mtime and both ends)."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if stat.st_size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            digest.update(fh.read(EDGE))
            fh.seek(-EDGE, os.SEEK_END)
            digest.update(fh.read(EDGE))
    return digest.hexdigest()


def folder_digest(folder: str | os.PathLike) -> str:
    """sha256 over the relative names and digests of every file below `folder` (links followed:
    a hub cache's snapshot is a folder of links to content-addressed blobs)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def weights_identity(name: str | None) -> str | None:
    """The identity of a model or surrogate named by a local path or a hub id: the digest of its
    files (for a hub id, of its snapshot in the local Hugging Face cache). A hub id that is not in
    the cache is its own identity (loading it fails later with a clear message)."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return folder_digest(path)
    if path.is_file():
        return file_digest(path)
    try:
        from huggingface_hub import snapshot_download

        return folder_digest(snapshot_download(str(name), local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached, offline, or not a valid id: the loader will say so)
        return f"hub:{name}"


@functools.cache
def source_revision() -> str:
    """The kvsweep commit the job runs (with "+changes" if the checkout has uncommitted edits), or
    the installed version outside a git checkout. Asked of git once per process: an evaluation
    job reads it for its checkpoint's fingerprint and for every result's provenance."""
    import subprocess

    from kvsweep import __version__

    root = Path(__file__).resolve().parents[3]  # the checkout (src/kvsweep/core/provenance.py)
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()  # fmt: skip
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return f"kvsweep {__version__}"
    return commit + ("+changes" if changed else "")
