"""The registry of evaluation methods: each method's settings, declared once, and its press builder.

A method file declares a `Method`: its settings (`Setting`: name, default, type, help), what its
sweep varies (a threshold, or one of its settings, e.g. StreamingLLM's window), and the function
that builds its press. The config schema of a method's block, the `kvsweep.evaluate` flags, the
defaults that `python -m kvsweep.config` prints and the README's method table are all made from
these declarations (`python -m kvsweep.methods` prints the table).

Nothing here imports torch or kvpress: the workflow reads the registry while planning, on a login
node with the light dependencies only; a builder imports the GPU stack when a job runs it.

Adding a method is one file in this folder defining a `Method`, and one entry in `registry.py`.
"""

import argparse
import importlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

from kvsweep.errors import KvsweepError
from kvsweep.thresholds import check_threshold

THRESHOLD = "threshold"


@dataclass(frozen=True)
class Setting:
    """One setting of a method: its name (config key; `--name-with-dashes` on the command line),
    its default, its type (int, float, bool or str), and the help the README and `--help` show."""

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


@dataclass(frozen=True)
class Method:
    """How to build the press of one method.

    `builder` ("module:function") is imported only when a press is built; the function receives
    the threshold (for threshold methods) and every setting as keywords, and returns a
    `StreamingThresholdPress`. `sweep` is what a study varies: `"threshold"`, the name of one of
    the settings (StreamingLLM sweeps its window), or None (baseline: one configuration).
    """

    name: str
    description: str
    builder: str | None = None
    settings: tuple[Setting, ...] = ()
    sweep: str | None = THRESHOLD
    window_setting: str | None = None
    # What the swept value means, for the README table.
    swept_meaning: str = ""
    # The method this one is a named variant of (same builder, other defaults).
    variant_of: str | None = None
    # Whether the compressible density falls as the swept value rises (target densities need it).
    density_falls: bool = True
    # The thresholds that mean something for the method's score (a probability: (0, 1)); -inf, which
    # evicts nothing, is always allowed. Outside it a threshold repeats an end of the range under
    # another output path.
    threshold_range: tuple[float, float] = (-math.inf, math.inf)
    _by_name: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {s.name: s for s in self.settings})
        if self.sweep not in (None, THRESHOLD) and self.sweep not in self._by_name:
            raise ValueError(f"method {self.name}: sweep '{self.sweep}' is not one of its settings")

    @property
    def takes_threshold(self) -> bool:
        return self.sweep == THRESHOLD

    @property
    def sweep_key(self) -> str | None:
        """The config key listing the swept values: thresholds, or e.g. sliding_windows."""
        return None if self.sweep is None else f"{self.sweep}s"

    @property
    def takes_targets(self) -> bool:
        """Target densities are calibrated along a threshold whose density falls as it rises."""
        return self.takes_threshold and self.density_falls

    def setting(self, name: str) -> Setting:
        return self._by_name[name]

    @property
    def defaults(self) -> dict[str, Any]:
        return {s.name: s.default for s in self.settings}

    def variant(self, name: str, description: str, **defaults) -> "Method":
        """The same method under another name with other defaults (e.g. kvzap without sinks)."""
        unknown = set(defaults) - set(self._by_name)
        if unknown:
            raise ValueError(f"variant {name}: {self.name} has no setting {', '.join(sorted(unknown))}")
        settings = tuple(replace(s, default=defaults.get(s.name, s.default)) for s in self.settings)
        return replace(self, name=name, description=description, settings=settings, variant_of=self.name)

    def resolve(self, threshold: float | None, given: dict[str, Any]) -> dict[str, Any]:
        """Check a threshold and the user's settings; return all settings with defaults filled."""
        if not self.takes_threshold and threshold is not None:
            raise KvsweepError(f"method '{self.name}' takes no threshold (got {threshold})")
        if self.takes_threshold:
            if threshold is None:
                raise KvsweepError(f"method '{self.name}' needs a threshold")
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise KvsweepError(f"method '{self.name}': threshold must be a number or -inf, got {threshold!r}")
            try:
                check_threshold(threshold)
            except KvsweepError as err:
                raise KvsweepError(f"method '{self.name}': {err}") from None
        unknown = sorted(set(given) - set(self._by_name))
        if unknown:
            allowed = ", ".join(sorted(self._by_name)) or "none"
            raise KvsweepError(f"method '{self.name}' does not take {', '.join(unknown)} (its settings: {allowed})")
        resolved = {**self.defaults, **{key: value for key, value in given.items() if value is not None}}
        return {key: self._by_name[key].check(f"method '{self.name}'", value) for key, value in resolved.items()}

    def check_threshold(self, threshold: float) -> float:
        """A threshold a user may ask of the method (config, command line): finite or -inf
        (`kvsweep.thresholds`), within its range. The engine itself takes any threshold."""
        threshold = check_threshold(threshold)
        low, high = self.threshold_range
        if threshold != -math.inf and not low <= threshold <= high:
            raise KvsweepError(
                f"threshold {threshold:g} is outside [{low:g}, {high:g}], the range of its score "
                f"({self.swept_meaning or 'the method score'}); -inf evicts nothing"
            )
        return threshold

    def window(self, settings: dict[str, Any]) -> int:
        return settings[self.window_setting] if self.window_setting else 0

    def build(self, threshold: float | None, settings: dict[str, Any]):
        """The method's press (None: no compression). Imports the GPU stack."""
        if self.builder is None:
            return None
        module, function = self.builder.split(":")
        build = getattr(importlib.import_module(module), function)
        return build(threshold, **settings) if self.takes_threshold else build(**settings)


def sinks(default: int) -> Setting:
    return Setting("sinks", default, "first tokens of the document, never evicted")


def sliding_window(default: int) -> Setting:
    return Setting("sliding_window", default, "most recent tokens, not yet decided (the DMS window)")


def all_methods() -> dict[str, Method]:
    from kvsweep.methods.registry import METHODS

    return METHODS


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise KvsweepError(f"unknown method '{name}'; known methods: {', '.join(methods)}")
    return methods[name]


def all_settings() -> dict[str, Setting]:
    """Every setting any method takes, once (a setting of the same name means the same thing)."""
    found = {}
    for method in all_methods().values():
        for setting in method.settings:
            found.setdefault(setting.name, setting)
    return found


def method_table() -> str:
    """The README's table of methods, made from the declarations."""
    lines = [
        "| method | what is swept | settings (default) | description |",
        "|---|---|---|---|",
    ]
    for method in all_methods().values():
        swept = (
            "-"
            if method.sweep is None
            else f"`{method.sweep_key}`" + (f": {method.swept_meaning}" if method.swept_meaning else "")
        )
        settings = ", ".join(
            f"`{s.name}` ({'from `model:`' if s.model_level else _shown(s.default)})" for s in method.settings
        )
        variant = f" Variant of `{method.variant_of}`." if method.variant_of else ""
        lines.append(f"| `{method.name}` | {swept} | {settings or '-'} | {method.description}.{variant} |")
    return "\n".join(lines)


def _shown(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
