"""The records of the calibration jobs, as score and comparison read them (a result line's fields
are its task's: `kvsweep.tasks`)."""


def read_calibrations(paths) -> list[dict]:
    """The records of calibration jobs (calibration/<method>/<target>.json): method (the config
    entry, from the path: the record names the method it ran), target_density, threshold
    (canonical), density, steps, documents."""
    import json
    from pathlib import Path

    return [{**json.loads(Path(path).read_text()), "method": Path(path).parent.name} for path in paths]
