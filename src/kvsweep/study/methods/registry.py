"""The method files of the registry, one line each; every `Method` a file declares (a method and
its named variants) is registered under its name, in the order of the files."""

import importlib

from kvsweep.study.methods import Method

FILES = (
    "baseline",
    "kvzap",
    "h2o",
    "streaming_llm",
    "random",
    "expected_attention",
    "knorm",
    "snapkv",
    "kvzip",
)

METHODS: dict[str, Method] = {}
for _file in FILES:
    for _value in vars(importlib.import_module(f"kvsweep.study.methods.{_file}")).values():
        if isinstance(_value, Method):
            METHODS.setdefault(_value.name, _value)
