"""The registry of evaluation methods: each method's settings and sweep, declared once.

A method file declares a `Method`: its settings (`Setting`: name, default, type, help), what its
sweep varies (a threshold, or one of its settings, e.g. StreamingLLM's window) and the range of
its threshold. The config schema of a method's block, the `kvsweep evaluate` flags, the defaults
that `kvsweep config` prints and the method table of docs/configuration.md are all made from these
declarations (`kvsweep methods` prints the table). The press of each method is built in the
engine (`kvsweep.engine.methods`), from the settings declared here.

Nothing here imports torch or kvpress: the workflow reads the registry while planning, on a login
node with the light dependencies only.

Adding a method: docs/contributing.md.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Any

from kvsweep.core.errors import KvsweepError
from kvsweep.core.settings import Setting
from kvsweep.core.thresholds import check_threshold

THRESHOLD = "threshold"


@dataclass(frozen=True)
class Method:
    """How to build the press of one method.

    Its press is built by `kvsweep.engine.methods.build_press` from the threshold (for threshold
    methods) and every setting. `sweep` is what a study varies: `"threshold"`, the name of one of
    the settings (StreamingLLM sweeps its window), or None (baseline: one configuration).
    """

    name: str
    description: str
    settings: tuple[Setting, ...] = ()
    sweep: str | None = THRESHOLD
    window_setting: str | None = None
    # What the swept value means, for the methods table.
    swept_meaning: str = ""
    # The method this one is a named variant of (same builder, other defaults).
    variant_of: str | None = None
    # Whether the compressible density falls as the swept value rises (target densities need it).
    density_falls: bool = True
    # The thresholds that mean something for the method's score (a probability: (0, 1)); -inf, which
    # evicts nothing, is always allowed. Outside it a threshold repeats an end of the range under
    # another output path.
    threshold_range: tuple[float, float] = (-math.inf, math.inf)
    # A score that exists only within the context's one pass (SnapKV: the attention of the
    # context's last queries): kvpress's protocol and `compression_ratios` only.
    ratio_only: bool = False
    # A method without a threshold whose positions still have an order (StreamingLLM: recency),
    # so a compression ratio keeps the top of it as kvpress's press does.
    ranks_at_ratio: bool = False
    # Whether `adaptive: true` (AdaKV's budget, shared by a layer's heads) applies at its ratios:
    # not where the method shares its budget its own way (KVzip: over every layer and head) or
    # ranks by position alone (StreamingLLM: every head ranks alike).
    adaptive_budget: bool = True
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
    def takes_ratios(self) -> bool:
        """Whether kvpress's `compression_ratios` apply: a score to keep the top of, or an order."""
        return self.takes_threshold or self.ranks_at_ratio

    @property
    def takes_targets(self) -> bool:
        """Target densities are calibrated along a threshold whose density falls as it rises."""
        return self.takes_threshold and self.density_falls and not self.ratio_only

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
        (`kvsweep.core.thresholds`), within its range. The engine itself takes any threshold."""
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


def sinks(default: int) -> Setting:
    return Setting("sinks", default, "first tokens of the document, never evicted")


def sliding_window(default: int) -> Setting:
    return Setting("sliding_window", default, "most recent tokens, not yet decided (the DMS window)")


def all_methods() -> dict[str, Method]:
    from kvsweep.study.methods.registry import METHODS

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
    """The table of methods (docs/methods.md, `kvsweep methods`), made from the declarations."""
    lines = [
        "| method | what is swept | settings (default) | description |",
        "|---|---|---|---|",
    ]
    for method in all_methods().values():
        swept = (
            "-"
            if method.sweep is None
            else "`compression_ratios` only (kvpress's protocol)"
            if method.ratio_only
            else f"`{method.sweep_key}`"
            + (f": {method.swept_meaning}" if method.swept_meaning else "")
            + _range(method)
        )
        settings = ", ".join(
            f"`{s.name}` ({'from `model:`' if s.model_level else _shown(s.default)})" for s in method.settings
        )
        variant = f" Variant of `{method.variant_of}`." if method.variant_of else ""
        lines.append(f"| `{method.name}` | {swept} | {settings or '-'} | {method.description}.{variant} |")
    return "\n".join(lines)


def _range(method: Method) -> str:
    """Where a threshold may lie, beside -inf (which evicts nothing), if bounded."""
    if not method.takes_threshold or method.ratio_only or method.threshold_range == (-math.inf, math.inf):
        return ""
    low, high = (_number(bound) for bound in method.threshold_range)
    return f", in [{low}, {high}]"


def _number(value: float) -> str:
    return "-inf" if value == -math.inf else "inf" if value == math.inf else f"{value:g}"


def _shown(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
