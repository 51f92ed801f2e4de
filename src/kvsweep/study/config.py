"""Validation of the workflow's config against its JSON schema, plus the checks a schema cannot
express (methods known to the registry, settings each method takes, thresholds that are numbers
and listed once). Defaults from the schema are filled in. Every problem is one readable message
that names the key and what is allowed."""

from functools import partial
from importlib.resources import files
from pathlib import Path

import jsonschema
import yaml

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import atomic_path
from kvsweep.core.paths import canonical_local_path, names_a_local_path
from kvsweep.core.thresholds import canonical_threshold
from kvsweep.study.methods import Method, all_methods, get_method
from kvsweep.study.shards import MAX_SHARDS, documents_per_shard, n_shards
from kvsweep.study.tasks import all_tasks, kvpress_protocol_tasks

# Shipped inside the package, so that validation works from any install (workflow/schemas/ links here).
# kvpress's AdaKVPress default: the share of its budget each head keeps at least.
ADAKV_SAFEGUARD = 0.2
SCHEMA = files("kvsweep.study") / "schemas" / "config.schema.yaml"


def _with_defaults(validator_class, integers: bool = True):
    """The jsonschema recipe for a validator that fills in `default` values as it validates, and
    writes a whole number given as a float (`512.0`, which JSON schema counts as an integer) as an
    int, so that no command line receives `--max-length=512.0`."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = subschema["default"]
                if integers and name in instance:
                    instance[name] = _as_integers(instance[name], subschema)
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _is_integer_schema(schema: dict) -> bool:
    kinds = schema.get("type")
    return kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds and "number" not in kinds)


def _as_integers(value, schema: dict):
    """`value` with whole floats made ints where `schema` asks for integers (lists of them too)."""
    if isinstance(value, float) and value.is_integer() and _is_integer_schema(schema):
        return int(value)
    if isinstance(value, list) and isinstance(schema.get("items"), dict) and _is_integer_schema(schema["items"]):
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    return value


def _describe(error: jsonschema.ValidationError, prefix: str = "") -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    where = (prefix + where).lstrip(".")
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {}))) or "none"
        return f"{where or 'top level'}: {error.message} (allowed keys: {allowed})"
    if error.validator == "enum":
        return (
            f"{where}: {error.instance!r} is not allowed (allowed values: {', '.join(map(str, error.validator_value))})"
        )
    return f"{where or 'top level'}: {error.message}"


def with_declarations(schema: dict) -> dict:
    """The config schema with what the registries declare: the known tasks, and each task's
    settings block (methods' blocks are checked one by one: `method_block_schema`)."""
    tasks = all_tasks()
    schema["properties"]["tasks"]["items"] = {"enum": list(tasks)}
    for task in tasks.values():
        if task.settings:
            schema["properties"][task.name] = task.settings_schema()
    return schema


def validate_config(config: dict, schema_path=SCHEMA) -> dict:
    """Validate `config` in place, fill defaults, and return it. Each method's block gets its `type`,
    every setting's default, and its swept values and target densities in canonical spelling
    (`canonical_values`, `canonical_targets`: their output paths)."""
    schema_path = Path(schema_path) if isinstance(schema_path, str) else schema_path
    schema = with_declarations(yaml.safe_load(schema_path.read_text()))
    if isinstance(config, dict):
        # A block written with nothing under it (`bootstrap:`) is YAML's null: every default.
        for name, block in schema["properties"].items():
            if config.get(name, {}) is None and block.get("type") == "object" and block.get("default") == {}:
                config[name] = {}
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise KvsweepError(_describe(jsonschema.exceptions.best_match(errors)))

    for name in config["methods"]:
        config["methods"][name] = _validate_method(name, config["methods"][name] or {})
    if config["methods"].get("baseline", {}).get("type", "baseline") != "baseline":
        raise KvsweepError(
            "methods.baseline: the entry named baseline must be the uncompressed baseline (type: baseline)"
        )
    if "baseline" not in config["methods"]:
        raise KvsweepError(
            "methods: 'baseline' is missing; every quality difference is paired with the uncompressed baseline "
            "on the same documents (add `baseline:` under methods)"
        )
    for block, key in (("model", "name"), ("model", "kvzap_surrogate"), ("dataset", "source")):
        if config[block][key] not in (None, TRAIN):
            config[block][key] = canonical_local_path(config[block][key])
            if names_a_local_path(config[block][key]) and ("{" in config[block][key] or "}" in config[block][key]):
                raise KvsweepError(
                    f"{block}.{key}: '{config[block][key]}': a local path is an input file of the workflow, and "
                    "Snakemake reads {name} in a file name as a wildcard; rename it, or link it from a name without braces"
                )
    dataset = config["dataset"]
    if dataset["min_length"] > dataset["max_length"]:
        raise KvsweepError(
            f"dataset.min_length ({dataset['min_length']}) exceeds dataset.max_length ({dataset['max_length']})"
        )
    if (
        "perplexity_kvpress" in config["tasks"]
        and dataset["min_length"] <= config["perplexity_kvpress"]["continuation_tokens"]
    ):
        raise KvsweepError(
            f"perplexity_kvpress.continuation_tokens ({config['perplexity_kvpress']['continuation_tokens']}): every "
            f"document needs more tokens than the continuation scored after it, but dataset.min_length is "
            f"{dataset['min_length']}; raise min_length or lower continuation_tokens"
        )
    _check_compression_ratios(config)
    if config["device"] == "cpu" and config["gpus_per_job"] > 1:
        raise KvsweepError(
            f"gpus_per_job: {config['gpus_per_job']} splits the model over GPUs, but device is cpu "
            "(use device: cuda, or gpus_per_job: 0 on the CPU)"
        )
    shards = n_shards(dataset["max_documents"], documents_per_shard(config))
    if shards > MAX_SHARDS:
        raise KvsweepError(
            f"dataset.max_documents: {dataset['max_documents']} documents make {shards} evaluation jobs per method and "
            f"value, more than {MAX_SHARDS}; put more documents in each (dataset.shard_size or dataset.shard_tokens)"
        )
    skip = config["calibration"]["skip_documents"]
    if skip is not None and skip < dataset["max_documents"]:
        raise KvsweepError(
            f"calibration.skip_documents ({skip}) is below dataset.max_documents ({dataset['max_documents']}): "
            "the calibration documents would be evaluated documents too"
        )
    return config


def adaptive_safeguard(config: dict, name: str) -> float | None:
    """An entry's AdaKV safeguard (kvpress's default 0.2), or None for a budget per head."""
    block = config["methods"][name]
    # (as a float: 1 and 1.0 are one job's params)
    return float(block.get("adaptive_safeguard", ADAKV_SAFEGUARD)) if block.get("adaptive") else None


def ratio_tasks(config: dict) -> list[str]:
    """The study's tasks that evaluate compression ratios: those in kvpress's protocol that compress
    the context once (not `summarization_kvpress` with `decoding: true`, which keeps evicting while
    it writes, where a fixed ratio decides once)."""
    kvpress = kvpress_protocol_tasks()
    return [task for task in config["tasks"] if task in kvpress and not (config.get(task) or {}).get("decoding")]


def with_compression_ratios(config: dict) -> list[str]:
    return [name for name, block in config["methods"].items() if block.get("canonical_ratios")]


def unused_compression_ratios(config: dict) -> list[str]:
    """The entries whose compression ratios no task evaluates: kvpress's budgets are evaluated by
    the `ratio_tasks` only (the workflow says so when it plans; a study may drop those tasks for a
    while without editing its methods)."""
    return [] if ratio_tasks(config) else with_compression_ratios(config)


def tasks_without_ratios(config: dict) -> list[str]:
    """The study's tasks in kvpress's protocol that evaluate no compression ratio though entries
    have some (`decoding: true`; the workflow says so when it plans)."""
    if not with_compression_ratios(config):
        return []
    kvpress, evaluating = kvpress_protocol_tasks(), ratio_tasks(config)
    return [task for task in config["tasks"] if task in kvpress and task not in evaluating]


def _check_compression_ratios(config: dict) -> None:
    """SnapKV's window fits every context its compression ratios are evaluated on."""
    if not with_compression_ratios(config):
        return
    # SnapKV scores with the context's last window_size queries: every context must be longer.
    shortest = config["dataset"]["min_length"]
    if "perplexity_kvpress" in config["tasks"]:
        shortest -= config["perplexity_kvpress"]["continuation_tokens"]
    for name, block in config["methods"].items():
        window = block.get("window_size")
        if method_of(config, name).ratio_only and window is not None and window >= shortest:
            raise KvsweepError(
                f"methods.{name}.window_size ({window}): the shortest context may have {shortest} tokens "
                "(dataset.min_length, less perplexity_kvpress.continuation_tokens), and SnapKV needs a longer one; "
                "lower window_size or raise min_length"
            )


def check_bootstrap(n_resamples: int, confidence: float, seed: int) -> None:
    """The bootstrap settings of a command line, against the config schema's `bootstrap` block."""
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["bootstrap"]
    given = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(given))
    if error is not None:
        flag = "--" + str(error.absolute_path[0]).replace("_", "-")
        raise KvsweepError(f"{flag}: {error.message}")


TRAIN = "train"


def surrogate_to_train(config: dict) -> str | None:
    """The folder the workflow trains a KVzap surrogate into for `model.kvzap_surrogate: train`,
    `results/<run>/kvzap_surrogate/<type>`, or None (a released surrogate, or a folder given).

    One fixed place, rather than any folder that does not exist yet: such a folder would be "to be
    made" on the first run and "given" on the next, and the plan would change under the user (the
    rule gone, edits of `surrogate:` ignored). Naming this folder explicitly later gives every KVzap
    job the same arguments, so switching from `train` to the path reruns nothing."""
    return trained_surrogate_path(config) if config["model"]["kvzap_surrogate"] == TRAIN else None


def trained_surrogate_path(config: dict) -> str:
    """Where `model.kvzap_surrogate: train` puts the study's surrogate."""
    return f"results/{config['run']}/kvzap_surrogate/{config['model']['kvzap_type']}"


def method_block_schema(method: Method) -> dict:
    """The JSON schema of a method's block in config.yaml, made from the method's declaration."""
    properties = {"type": {"type": "string", "description": "the method this entry runs (default: its name)"}}
    if method.sweep_key and not method.ratio_only:
        # A threshold is a number, or a string such as "5e-4" (YAML 1.1 reads 5e-4 without a dot as
        # text) or "-inf", parsed and checked by kvsweep.core.thresholds; a swept setting is its own type.
        values = {"type": ["number", "string"]} if method.takes_threshold else method.setting(method.sweep).schema()
        properties[method.sweep_key] = {"type": "array", "minItems": 1, "items": values}
    if method.takes_ratios:
        properties["compression_ratios"] = {
            "description": "kvpress's budgets (the share of the context evicted, per KV head, lowest scores first), "
            "for the tasks in kvpress's protocol",
            "type": "array",
            "minItems": 1,
            "items": {"type": ["number", "string"]},
        }
    if method.takes_ratios and method.adaptive_budget:
        properties["adaptive"] = {
            "type": "boolean",
            "description": "AdaKV's budget at the compression ratios (kvpress AdaKVPress): a layer's heads share it",
        }
        properties["adaptive_safeguard"] = {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "with adaptive: the share of its budget each head keeps at least (AdaKV's 0.2 if not given)",
        }
    if method.takes_targets:
        properties["target_densities"] = {
            "description": "compressible KV densities to reach; the threshold of each is calibrated",
            "type": "array",
            "minItems": 1,
            # A string too, as thresholds: YAML 1.1 reads 3e-1 (no dot) as text; `_target_density` checks it.
            "items": {"type": ["number", "string"], "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        }
    for setting in method.settings:
        if not setting.model_level and setting.name != method.sweep:
            properties[setting.name] = setting.schema()
    return {"type": "object", "additionalProperties": False, "properties": properties}


def method_of(config: dict, name: str) -> Method:
    """The method a config entry runs: its `type`, or its own name."""
    return get_method(config["methods"][name].get("type", name))


def _validate_method(name: str, block: dict) -> dict:
    """One entry of `methods:` checked against its method's declaration; returned with its type,
    every setting's default, and its swept values and targets in canonical spelling."""
    where = f"methods.{name}"
    # Validating a validated config again gives the same config.
    block = {k: v for k, v in block.items() if k not in ("canonical_values", "canonical_targets", "canonical_ratios")}
    kind = block.get("type", name)
    methods = all_methods()
    if not isinstance(kind, str):
        raise KvsweepError(f"{where}.type: {kind!r} is not a method name (known methods: {', '.join(methods)})")
    if kind == "baseline" and name != "baseline":
        raise KvsweepError(
            f"{where}.type: only the entry named baseline is the uncompressed baseline (every difference is paired with it)"
        )
    if kind not in methods:
        key = f"{where}.type" if "type" in block else where
        raise KvsweepError(
            f"{key}: unknown method '{kind}' (known methods: {', '.join(methods)}; another name needs `type:`)"
        )
    method = methods[kind]
    # (a method's settings are converted by their own check; its swept values keep their spelling
    # for the messages about them, and get their canonical one below)
    validator = _with_defaults(jsonschema.Draft202012Validator, integers=False)(method_block_schema(method))
    errors = sorted(validator.iter_errors(block), key=lambda e: list(e.absolute_path))
    if errors:
        raise KvsweepError(_describe(jsonschema.exceptions.best_match(errors), where))
    values, targets = block.get(method.sweep_key) if method.sweep_key else None, block.get("target_densities")
    ratios = block.get("compression_ratios")
    if method.sweep_key and not values and not targets and not ratios:
        needs = (
            "compression_ratios (its score exists in kvpress's protocol only)"
            if method.ratio_only
            else f"{method.sweep_key}, target_densities or compression_ratios (any of them)"
            if method.takes_targets
            else f"{method.sweep_key} or compression_ratios (either)"
            if method.takes_ratios
            else method.sweep_key
        )
        raise KvsweepError(f"{where}: '{kind}' needs {needs}")
    budget_keys = ("compression_ratios", "adaptive", "adaptive_safeguard")
    settings = {k: v for k, v in block.items() if k not in ("type", "target_densities", *budget_keys, method.sweep_key)}
    if block.get("adaptive") and not ratios:
        raise KvsweepError(f"{where}.adaptive: AdaKV shares a compression ratio's budget; give compression_ratios")
    if "adaptive_safeguard" in block and not block.get("adaptive"):
        raise KvsweepError(f"{where}.adaptive_safeguard: only with adaptive: true (AdaKV's budget)")
    try:
        resolved = method.resolve(0.0 if method.takes_threshold else None, settings)
    except KvsweepError as err:
        raise KvsweepError(f"{where}: {err}") from None
    checked = {"type": kind}
    if values:
        checked[method.sweep_key] = values
    if targets:
        checked["target_densities"] = targets
    if ratios:
        checked["compression_ratios"] = ratios
    for key in ("adaptive", "adaptive_safeguard"):
        if key in block:
            checked[key] = block[key]
    for setting in method.settings:
        if not setting.model_level and setting.name != method.sweep:
            checked[setting.name] = resolved[setting.name]
    if method.sweep_key:
        canonical = (
            partial(_method_threshold, method)
            if method.takes_threshold
            else partial(method.setting(method.sweep).canonical, f"method '{kind}'")
        )
        checked["canonical_values"] = _canonical_list(where, method.sweep_key, values or [], canonical)
        checked["canonical_targets"] = _canonical_list(where, "target_densities", targets or [], _target_density)
    if method.takes_ratios:
        checked["canonical_ratios"] = _canonical_list(where, "compression_ratios", ratios or [], _compression_ratio)
    return checked


def _method_threshold(method: Method, value) -> str:
    """A threshold's canonical spelling, once it is known to lie in the method's range."""
    text = canonical_threshold(value)
    method.check_threshold(float(text))
    return text


def _target_density(value) -> str:
    """A target density's canonical spelling (its path), once it is known to lie in (0, 1)."""
    try:
        text = canonical_threshold(value)
    except KvsweepError:
        raise KvsweepError(f"{value!r} is not a density (a number between 0 and 1)") from None
    if not 0 < float(text) < 1:
        raise KvsweepError(f"{value!r} is not a density strictly between 0 and 1")
    return text


def _compression_ratio(value) -> str:
    """A compression ratio's canonical spelling, once it is known to lie in [0, 1)."""
    try:
        text = canonical_threshold(value)
    except KvsweepError:
        raise KvsweepError(f"{value!r} is not a compression ratio (a share of the context, from 0 up to 1)") from None
    if not 0 <= float(text) < 1:
        raise KvsweepError(f"{value!r} is not a compression ratio in [0, 1) (the share of the context evicted)")
    return text


def _canonical_list(where: str, key: str, values: list, canonical) -> list[str]:
    """Each value in its canonical spelling (its path), each once."""
    found = {}
    for i, value in enumerate(values):
        try:
            text = canonical(value)
        except KvsweepError as err:
            raise KvsweepError(f"{where}.{key}[{i}]: {err}") from None
        if text in found:
            raise KvsweepError(f"{where}.{key} lists {text} twice (as {found[text]!r} and {value!r})")
        found[text] = value
    return list(found)


def method_settings(config: dict, name: str) -> dict:
    """The settings one entry's jobs receive: its own block, plus the KVzap surrogate for KVzap."""
    method = method_of(config, name)
    given = {k: v for k, v in config["methods"][name].items() if k in method.defaults and k != method.sweep}
    for setting in method.settings:
        if setting.model_level:
            given[setting.name] = config["model"].get(setting.name)
    if given.get("kvzap_surrogate") == TRAIN:
        given["kvzap_surrogate"] = surrogate_to_train(config)
    return method.resolve(0.0 if method.takes_threshold else None, given)


def write_resolved(config: dict, path: str) -> None:
    """A validated config (defaults filled in) as YAML, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
