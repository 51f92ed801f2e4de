"""The registry of evaluation methods: a name, its settings with defaults, and a press builder.

Adding a method is one small file in this folder defining a `Method`, and one entry in `METHODS`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvsweep.errors import KvsweepError
from kvsweep.thresholds import check_threshold


@dataclass(frozen=True)
class Method:
    """How to build the press of one method.

    `build(threshold, **settings)` returns a `StreamingThresholdPress`, or None for no compression.
    `settings` holds every setting the method takes and its default; the protected window is the
    setting named by `window_setting`, and `sinks` the never-evicted prefix.
    """

    name: str
    description: str
    build: Callable[..., Any]
    settings: dict[str, Any] = field(default_factory=dict)
    takes_threshold: bool = True
    window_setting: str | None = None
    choices: dict[str, tuple] = field(default_factory=dict)

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
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            allowed = ", ".join(sorted(self.settings)) or "none"
            raise KvsweepError(f"method '{self.name}' does not take {', '.join(unknown)} (its settings: {allowed})")
        resolved = {**self.settings, **{key: value for key, value in given.items() if value is not None}}
        for key in ("sliding_window", "local_window", "sinks"):
            if key in resolved and (not isinstance(resolved[key], int) or resolved[key] < 0):
                raise KvsweepError(f"method '{self.name}': {key} must be a whole number >= 0, got {resolved[key]!r}")
        for key, allowed in self.choices.items():
            if resolved[key] not in allowed:
                raise KvsweepError(
                    f"method '{self.name}': {key} must be one of {', '.join(allowed)}, got {resolved[key]!r}"
                )
        return resolved

    def window(self, settings: dict[str, Any]) -> int:
        return settings[self.window_setting] if self.window_setting else 0


def get_method(name: str) -> Method:
    from kvsweep.methods.registry import METHODS

    if name not in METHODS:
        raise KvsweepError(f"unknown method '{name}'; known methods: {', '.join(METHODS)}")
    return METHODS[name]
