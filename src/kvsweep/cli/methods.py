"""`kvsweep methods`: the table of methods and their settings (as in docs/configuration.md)."""

HELP = "list every method, what it sweeps and its settings"
JOB = False


def add_arguments(parser) -> None:
    pass


def run(args, clock) -> None:
    from kvsweep.study.methods import method_table

    print(method_table())
