"""The records the calibration jobs write (calibration/<method>/<target>.json), read checked: the
workflow reads the threshold each found, score and comparison the target each threshold met."""

import json
from pathlib import Path

from kvsweep.core.errors import KvsweepError
from kvsweep.core.thresholds import canonical_threshold

CALIBRATION_FIELDS = ("target_density", "threshold")  # what the workflow, score and comparison read of a record


def read_calibrations(paths) -> list[dict]:
    """The records of calibration jobs (calibration/<method>/<target>.json): method (the config
    entry, from the path: the record names the method it ran), target_density, threshold
    (canonical), density, steps, documents."""
    records = []
    for path in paths:
        path = Path(path)
        if path.name.endswith(".stages.json"):
            raise KvsweepError(
                f"{path}: a job's stage record, not a calibration record (calibration/<method>/<target>.json)"
            )
        try:
            record = json.loads(path.read_text())
        except OSError as err:
            raise KvsweepError(f"{path}: {err.strerror or err}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise KvsweepError(f"{path}: not a whole calibration record ({err})") from None
        missing = [key for key in CALIBRATION_FIELDS if not isinstance(record, dict) or key not in record]
        if missing:
            raise KvsweepError(f"{path}: not a calibration record (no {', '.join(missing)})")
        target = record["target_density"]
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1:
            raise KvsweepError(f"{path}: target_density {target!r} is not a density between 0 and 1")
        try:
            canonical_threshold(record["threshold"])
        except (KvsweepError, TypeError, ValueError):
            raise KvsweepError(f"{path}: threshold {record['threshold']!r} is not a threshold") from None
        records.append({**record, "method": path.parent.name})
    return records
