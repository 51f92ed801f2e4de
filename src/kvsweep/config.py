"""Validation of the workflow's config against its JSON schema, plus the checks a schema cannot
express (methods known to the registry, settings each method takes, thresholds that are numbers
and listed once). Defaults from the schema are filled in. Every problem is one readable message
that names the key and what is allowed."""

import sys
from importlib.resources import files
from pathlib import Path

import jsonschema
import yaml

from kvsweep.errors import KvsweepError, readable_errors
from kvsweep.methods import get_method
from kvsweep.thresholds import canonical_threshold

# Shipped inside the package, so that validation works from any install (workflow/schemas/ links here).
SCHEMA = files("kvsweep") / "schemas" / "config.schema.yaml"

# The keys of a method's block that are not settings of its jobs.
LIST_KEYS = ("thresholds", "canonical_thresholds", "target_densities", "canonical_targets")

# Settings that live under `model:` in the config but are passed to the KVzap methods.
MODEL_LEVEL_SETTINGS = ("kvzap_surrogate", "kvzap_type")


def _with_defaults(validator_class):
    """The jsonschema recipe for a validator that fills in `default` values as it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = subschema["default"]
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _describe(error: jsonschema.ValidationError) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {}))) or "none"
        return f"{where or 'top level'}: {error.message} (allowed keys: {allowed})"
    if error.validator == "enum":
        return (
            f"{where}: {error.instance!r} is not allowed (allowed values: {', '.join(map(str, error.validator_value))})"
        )
    return f"{where or 'top level'}: {error.message}"


def validate_config(config: dict, schema_path=SCHEMA) -> dict:
    """Validate `config` in place, fill defaults, and return it with canonical thresholds added
    under each method as `canonical_thresholds`."""
    schema_path = Path(schema_path) if isinstance(schema_path, str) else schema_path
    schema = yaml.safe_load(schema_path.read_text())
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise KvsweepError(_describe(jsonschema.exceptions.best_match(errors)))

    for name, settings in config["methods"].items():
        settings = config["methods"][name] = settings or {}
        method = get_method(name)
        thresholds, targets = settings.get("thresholds"), settings.get("target_densities")
        if not method.takes_threshold and (thresholds is not None or targets is not None):
            raise KvsweepError(f"methods.{name}: '{name}' takes no thresholds or target densities")
        if method.takes_threshold and not thresholds and not targets:
            raise KvsweepError(f"methods.{name}: '{name}' needs thresholds, target_densities, or both")
        extra = {k: v for k, v in settings.items() if k not in ("thresholds", "target_densities")}
        try:
            method.resolve(0.0 if method.takes_threshold else None, extra)
        except KvsweepError as err:
            raise KvsweepError(f"methods.{name}: {err}") from None
        if method.takes_threshold:
            settings["canonical_thresholds"] = _canonical_list(name, "thresholds", thresholds or [])
            settings["canonical_targets"] = _canonical_list(name, "target_densities", targets or [])
    if "baseline" not in config["methods"]:
        raise KvsweepError(
            "methods: 'baseline' is missing; every quality difference is paired with the uncompressed baseline "
            "on the same documents (add `baseline:` under methods)"
        )
    dataset = config["dataset"]
    if dataset["min_length"] > dataset["max_length"]:
        raise KvsweepError(
            f"dataset.min_length ({dataset['min_length']}) exceeds dataset.max_length ({dataset['max_length']})"
        )
    return config


def _canonical_list(method: str, key: str, values: list) -> list[str]:
    """Each value in its canonical spelling (its path), each once."""
    canonical = {}
    for i, value in enumerate(values):
        try:
            text = canonical_threshold(value)
        except KvsweepError as err:
            raise KvsweepError(f"methods.{method}.{key}[{i}]: {err}") from None
        if text in canonical:
            raise KvsweepError(f"methods.{method}.{key} lists {text} twice (as {canonical[text]!r} and {value!r})")
        canonical[text] = value
    return list(canonical)


def method_settings(config: dict, name: str) -> dict:
    """The settings one method's jobs receive: its own block, plus the KVzap surrogate for KVzap."""
    method = get_method(name)
    given = {k: v for k, v in config["methods"][name].items() if k not in LIST_KEYS}
    for key in MODEL_LEVEL_SETTINGS:
        if key in method.settings:
            given[key] = config["model"].get(key)
    return method.resolve(0.0 if method.takes_threshold else None, given)


def write_resolved(config: dict, path: str) -> None:
    """A validated config (defaults filled in) as YAML, written atomically."""
    from kvsweep.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))


def main(argv=None):
    """`python -m kvsweep.config CONFIG.yaml`: validate a config and print it with defaults."""
    argv = sys.argv[1:] if argv is None else argv
    with readable_errors("kvsweep.config"):
        if len(argv) != 1:
            raise KvsweepError("usage: python -m kvsweep.config CONFIG.yaml")
        try:
            config = yaml.safe_load(Path(argv[0]).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise KvsweepError(f"{argv[0]}: {err}") from None
        print(yaml.safe_dump(validate_config(config), sort_keys=False))


if __name__ == "__main__":
    main()
