"""A setting of a method or a task, declared once: its config key and command-line flag, default,
type, range and help. The config schema, the commands' flags and the docs are made from it."""

import argparse
from dataclasses import dataclass
from typing import Any

from kvsweep.core.errors import KvsweepError


@dataclass(frozen=True)
class Setting:
    """One setting of a method or a task: its name (config key; `--name-with-dashes` on the command line),
    its default, its type (int, float, bool or str), and the help the docs and `--help` show."""

    name: str
    default: Any
    help: str
    kind: type = int
    minimum: float | None = 0
    maximum: float | None = None
    choices: tuple = ()
    # Given under `model:` in the config (the KVzap surrogate belongs to the model, not the method).
    model_level: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def schema(self) -> dict:
        """The JSON schema of the setting's value in a config file."""
        if self.choices:
            return {"enum": list(self.choices), "description": self.help}
        kinds = {int: "integer", float: "number", bool: "boolean", str: "string"}
        schema = {"type": [kinds[self.kind], "null"] if self.default is None else kinds[self.kind]}
        if self.minimum is not None and self.kind in (int, float):
            schema["minimum"] = self.minimum
        if self.maximum is not None and self.kind in (int, float):
            schema["maximum"] = self.maximum
        return {**schema, "description": self.help}

    def check(self, owner: str, value) -> Any:
        """`value` if it is a valid value of this setting, else one readable error that names
        `owner` (e.g. "method 'h2o'")."""
        if value is None and self.default is None:
            return value
        if self.choices:
            if value not in self.choices:
                raise KvsweepError(
                    f"{owner}: {self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
                )
            return value
        ok = isinstance(value, self.kind) and not (self.kind is not bool and isinstance(value, bool))
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if self.kind is int and isinstance(value, float) and value.is_integer():  # 64.0 is 64 (as in JSON schema)
            ok, value = True, int(value)
        if not ok:
            what = {int: "a whole number", float: "a number", bool: "true or false", str: "a text"}[self.kind]
            raise KvsweepError(f"{owner}: {self.name} must be {what}, got {value!r}")
        if self.minimum is not None and self.kind in (int, float) and value < self.minimum:
            raise KvsweepError(f"{owner}: {self.name} must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and self.kind in (int, float) and value > self.maximum:
            raise KvsweepError(f"{owner}: {self.name} must be <= {self.maximum:g}, got {value!r}")
        return value

    def canonical(self, owner: str, value) -> str:
        """The value's one spelling in an output path (64 and 64.0 are the same window)."""
        return str(self.check(owner, value))

    def parse(self, text: str):
        """A command-line value, converted to the setting's type (checked later by `check`); a
        value of another type is argparse's usage error, naming the flag."""
        if self.kind is bool:
            if text.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")
            return text.lower() == "true"
        try:
            return self.kind(text)
        except ValueError:
            what = {int: "a whole number", float: "a number", str: "a text"}[self.kind]
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
