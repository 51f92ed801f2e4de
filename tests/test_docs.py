"""The generated parts of the docs are what the commands print, and every path and command the
docs name exists."""

import re
from pathlib import Path

import pytest

from kvsweep.study.config_reference import key_table
from kvsweep.study.methods import method_table

ROOT = Path(__file__).resolve().parents[1]


def between(text: str, start: str, end: str) -> str:
    assert start in text, f"marker {start!r} is missing"
    return text.split(start + "\n", 1)[1].split(end, 1)[0]


def test_the_configuration_page_lists_every_key_as_the_schema_declares():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert between(page, "<!-- keys: kvsweep config --keys -->", "<!-- end of keys -->") == key_table()


@pytest.mark.parametrize("page", ["configuration.md", "methods.md"])
def test_the_methods_table_is_the_declared_one(page):
    text = (ROOT / "docs" / page).read_text()
    assert (
        between(text, "<!-- methods table: kvsweep methods -->", "<!-- end of methods table -->")
        == method_table() + "\n"
    )


def commands_in(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_performance_pages_rerun_commands_exist():
    """Every script the rerun commands name exists, takes every option they pass, and every test
    path they name exists; every JSON a table cites is committed."""
    commands = commands_in("performance.md")
    assert len(commands) >= 5
    for command in commands:
        words = command.split()
        paths = [w for w in words if w.startswith(("benchmarks/", "tests/"))]
        assert paths, command
        for path in paths:
            assert (ROOT / path).exists(), f"{path} in {command!r}"
        script = next((w for w in words if w.startswith("benchmarks/") and w.endswith(".py")), None)
        if script:
            source = (ROOT / script).read_text()
            for option in re.findall(r"(--[a-z][a-z0-9-]*)", command):
                assert f'"{option}"' in source, f"{script} takes no {option}"
    page = (ROOT / "docs" / "performance.md").read_text()
    for name in re.findall(r"`([\w.-]+\.json)`", page):
        if name[0] not in "ABCDEFG" or not name[1:].startswith(".json"):
            assert (ROOT / "benchmarks" / "results" / name).exists(), name


def test_every_docs_page_is_linked_from_the_readme_and_names_existing_files():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README links no docs/{page.name}"
    for text in [readme, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"`((?:src|tests|benchmarks|workflow|profiles|envs|demo|slurm)/[\w./-]+)`", text):
            if "<" not in path and "*" not in path:
                assert (ROOT / path).exists(), path
