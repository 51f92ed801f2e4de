"""Reading a study's config file strictly: UTF-8 text, YAML (or JSON) whose mappings name each key
once, a mapping at the top. PyYAML and Snakemake keep the last of two equal keys silently (`run:`
twice plans a whole new study), and a file in another encoding stops Snakemake with a traceback."""

from pathlib import Path

import yaml

from kvsweep.core.errors import KvsweepError


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names a key twice."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            # The mapping's own keys only: a key merged in with `<<:` may be overridden here.
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if first is not None:
                    raise KvsweepError(
                        f"line {key_node.start_mark.line + 1}: key '{key}' appears twice in one mapping "
                        f"(first at line {first}); YAML would keep the last silently"
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict:
    """The mapping a config file holds; any problem is one message naming the file and the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise KvsweepError(f"config file {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise KvsweepError(
            f"config file {path}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save it as UTF-8"
        ) from None
    try:
        config = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except KvsweepError as err:
        raise KvsweepError(f"config file {path}, {err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f", line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise KvsweepError(f"config file {path}{at}: not valid YAML ({problem})") from None
    if not isinstance(config, dict):
        raise KvsweepError(f"config file {path}: expected a mapping of keys (run:, model:, ...) at the top")
    return config
