"""Atomic writes: nothing half-written is left at the output path, and files get the permissions
the umask gives (collaborators can read results)."""

import os

import pytest

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import atomic_path, read_jsonl, write_jsonl_atomic


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_jsonl_atomic(tmp_path / "a.jsonl", [{"x": 1}])
        with atomic_path(tmp_path / "deeper" / "b.csv") as tmp:
            tmp.write_text("x\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == mode
    assert (tmp_path / "deeper" / "b.csv").stat().st_mode & 0o777 == mode


def test_a_failed_block_leaves_neither_output_nor_temporary_file(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_made_is_one_message(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KvsweepError, match="cannot create the folder of .*file/sub/out.jsonl"):
        write_jsonl_atomic(tmp_path / "file" / "sub" / "out.jsonl", [])


def test_bytes_that_are_not_utf8_are_one_message(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"report": "fine"}\n{"report": "caf\xe9"}\n')
    with pytest.raises(KvsweepError, match=r"in.jsonl, line 2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        read_jsonl(tmp_path / "in.jsonl")
