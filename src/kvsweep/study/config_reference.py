"""The reference of a study's config keys, made from the schema and the declarations: every key,
its default and its meaning (docs/configuration.md holds it, and `kvsweep config --keys` prints
it; a test keeps the two equal)."""

import yaml

from kvsweep.study.config import SCHEMA, with_declarations

# A method entry's keys: its block's schema is made per method (`config.method_block_schema`).
METHOD_ENTRY_KEYS = (
    ("methods.<name>", "(`baseline` required)", "an entry of the study: `<name>` is its name in paths and tables"),
    ("methods.<name>.type", "`<name>`", "the method the entry runs (`kvsweep methods`); several entries may run one "
     "method with other settings, e.g. `h2o_w128: {type: h2o, local_window: 128, thresholds: [...]}` beside `h2o`"),
    ("methods.<name>.thresholds", "", "the thresholds to sweep: numbers or `-inf` (evicts nothing), within the "
     "method's range (`kvsweep methods`); NaN and +inf (what `1e400` overflows to) are refused. Every entry but "
     "`baseline` needs its swept values, `target_densities` or `compression_ratios`"),
    ("methods.<name>.sliding_windows", "", "`streaming_llm` only: the windows to sweep (its density is set by the window)"),
    ("methods.<name>.target_densities", "", "compressible KV densities (0 < d < 1) to reach; each gets a calibrated "
     "threshold (methods that sweep a threshold; docs/configuration.md, \"Stating a study in target densities\")"),
    ("methods.<name>.compression_ratios", "", "kvpress's budgets (0 <= r < 1: the share of the context evicted, per "
     "KV head, lowest scores first, as kvpress's `ScorerPress`), for methods with a score and `streaming_llm` (its "
     "sinks and the most recent positions, as kvpress's `StreamingLLMPress`); `kvzip` shares one budget over every "
     "layer and head, as kvpress's `KVzipPress`. Evaluated by the tasks in kvpress's protocol only, each in "
     "`<task>/<name>/ratio_<r>/` (docs/methods.md, \"Two protocols\")"),
    ("methods.<name>.adaptive", "`false`", "with `compression_ratios`: AdaKV's budget (kvpress `AdaKVPress`): a layer's "
     "heads share it, the lowest scores over all of them evicted; an entry of its own beside the per-head one "
     "(`knorm_ada: {type: knorm, adaptive: true, ...}`); not for `streaming_llm` and `kvzip`, whose budgets are "
     "their own"),
    ("methods.<name>.adaptive_safeguard", "0.2", "with `adaptive: true`: the share of its budget each head keeps at "
     "least (AdaKV's alpha)"),
    ("methods.<name>.<setting>", "the method's", "any setting of the entry's method (the methods table); "
     "`kvzap_surrogate` and `kvzap_type` are given under `model:`"),
)  # fmt: skip


def key_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every key of a study's config, in the schema's order."""
    schema = with_declarations(yaml.safe_load(SCHEMA.read_text()))
    rows = []
    _walk(schema, "", rows)
    return rows


def key_table() -> str:
    """The keys as a Markdown table."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {meaning} |" for key, default, meaning in key_rows()]
    return "\n".join(lines) + "\n"


def _walk(schema: dict, prefix: str, rows: list) -> None:
    required = set(schema.get("required", ()))
    for name, node in schema["properties"].items():
        key = prefix + name
        if name == "methods" and not prefix:
            rows.extend(METHOD_ENTRY_KEYS)
        elif node.get("type") == "object" and "properties" in node:
            _walk(node, key + ".", rows)
        else:
            default = "(required)" if name in required else _shown(node.get("default"))
            rows.append((key, default, _meaning(node)))


def _meaning(node: dict) -> str:
    meaning = node.get("description", "")
    if "enum" in node:
        meaning += ("; " if meaning else "") + " or ".join(f"`{value}`" for value in node["enum"])
    return meaning


def _shown(value) -> str:
    if isinstance(value, bool) or value is None:
        return f"`{str(value).lower() if value is not None else 'null'}`"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, list):
        return "`[" + ", ".join(map(str, value)) + "]`"
    return str(value)
