"""`kvsweep config CONFIG.yaml`: validate a study's config file and print it with every default;
`kvsweep config --keys`: every key a config may hold (docs/configuration.md)."""

import yaml

from kvsweep.core.errors import KvsweepError

HELP = "validate a study's config file and print it with every default filled in (--keys: every key)"
JOB = False


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="the study's config file (YAML)")
    parser.add_argument("--keys", action="store_true", help="print every key, its default and meaning (Markdown)")


def run(args, clock) -> None:
    if args.keys:
        from kvsweep.study.config_reference import key_table

        print(key_table(), end="")
        return
    if args.config is None:
        raise KvsweepError("give a config file to check, or --keys")
    from kvsweep.study.config import validate_config
    from kvsweep.study.config_files import read_config_file

    config = validate_config(read_config_file(args.config))
    for block in config["methods"].values():  # the paths' spelling: not something to edit
        for key in ("canonical_values", "canonical_targets", "canonical_ratios"):
            block.pop(key, None)
    print(yaml.safe_dump(config, sort_keys=False))
