"""The rules' shape: each command is built from what Snakemake tracks, and the rules' software
is the package's."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
# What a command may be built from: the rule's params (every setting, tracked by the params
# trigger), inputs, outputs, log, wildcards and resources (speed and memory only, never a result).
TRACKED = re.compile(r"\{(params|input|output|log|wildcards|resources|threads)(\.[A-Za-z_][A-Za-z0-9_]*)?(:q)?\}")


def shell_commands() -> list[tuple[str, str]]:
    """(file, command) for every rule's `shell:` (its adjacent string literals joined)."""
    found = []
    for path in RULES:
        text = path.read_text()
        for match in re.finditer(r"^(\s*)shell:\n((?:\1\s+\".*\"\n?)+)", text, re.M):
            command = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(2)))
            found.append((path.name, command))
    return found


def test_every_rule_has_a_command_that_is_found():
    commands = shell_commands()
    rules = sum(len(re.findall(r"^\s*(rule|checkpoint) \w+:", path.read_text(), re.M)) for path in RULES)
    runs = sum(len(re.findall(r"^\s*(run|script|wrapper):", path.read_text(), re.M)) for path in RULES)
    assert len(commands) + runs == rules - sum("rule all:" in path.read_text() for path in RULES)


def test_commands_hold_no_setting_of_their_own():
    """With Snakemake's `code` rerun trigger off (profiles/default/config.yaml), a setting written
    into a command's text would change results without rerunning anything: every value comes from
    a tracked placeholder, and every option takes its value from one."""
    for name, command in shell_commands():
        placeholders = re.findall(r"\{[^{}]*\}", command.replace("{{", "").replace("}}", ""))
        for placeholder in placeholders:
            assert TRACKED.fullmatch(placeholder), f"{name}: {placeholder} in {command!r}"
        bare = TRACKED.sub("X", command)
        for option in re.findall(r"--[a-z-]+(?:=(\S*))?", bare):
            assert option in ("", "X"), f"{name}: an option with a written value in {command!r}"
        for word in bare.split():
            assert not re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", word), f"{name}: a number {word} in {command!r}"


def test_the_code_trigger_is_off_and_said_why():
    profile = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert sorted(profile["rerun-triggers"]) == ["input", "mtime", "params", "software-env"]


def test_the_rules_environment_is_the_packages_dependencies():
    """envs/kvsweep.yaml (the rules' software with `--sdm conda`) holds pyproject.toml's
    dependencies, less Snakemake's own (which runs the workflow, not the jobs)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "envs" / "kvsweep.yaml").read_text())["dependencies"]
    pip = next(item["pip"] for item in env if isinstance(item, dict))
    assert pip == [d.split("#")[0].strip() for d in project if not d.startswith("snakemake")]
