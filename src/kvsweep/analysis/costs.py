"""Where a study's model jobs spent their time: their stage records (`kvsweep.core.timing`) added
up per kind of job (evaluation, calibration, surrogate training) and stage."""

from pathlib import Path

import pandas as pd

from kvsweep.core.io import atomic_path
from kvsweep.core.timing import MODEL_WORK, STAGES, read_stage_record


def study_costs(jobs: dict[str, list[str]]) -> tuple[pd.DataFrame, list[str]]:
    """The stage records of the jobs that wrote each group's outputs (e.g. {"evaluation": [...],
    "calibration": [...]}), added up per group and stage, and over all groups: seconds, share of
    the jobs' wall time, GPU-seconds (seconds x the job's GPUs) and mean per job. Also one line
    per group saying how many jobs it covers and what share of their time was fixed cost."""
    groups = {name: [r for output in outputs if (r := read_stage_record(output)) is not None]
              for name, outputs in jobs.items()}  # fmt: skip
    groups["all"] = [record for records in groups.values() for record in records]
    tables, lines = [], []
    for name, records in groups.items():
        table = _stage_table(records).assign(jobs=name)
        tables.append(table)
        wall, work = table.seconds.iloc[-1], table.set_index("stage").seconds[MODEL_WORK]
        if not records:
            lines.append(f"{name} jobs: no stage records")
            continue
        line = (
            f"{name} jobs ({len(records)}): {wall:.0f} s of wall time ({table.gpu_seconds.iloc[-1]:.0f} GPU-seconds); "
            f"{work / wall:.0%} model work, {1 - work / wall:.0%} fixed cost ({(wall - work) / len(records):.1f} s per job)"
        )
        launches = [r["launch_s"] for r in records if "launch_s" in r]
        if launches:
            line += f"; SLURM's job launch before the processes: {sum(launches):.0f} s more"
        missing = len(jobs[name]) - len(records) if name in jobs else 0
        if missing:
            line += f"; {missing} job(s) without a stage record (run before kvsweep recorded stages) left out"
        lines.append(line)
    table = pd.concat(tables, ignore_index=True)
    return table[["jobs", "stage", "seconds", "share", "gpu_seconds", "per_job_s"]], lines


def _stage_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for name in (*STAGES, "wall"):
        seconds = [r["wall_s"] if name == "wall" else float(r["stages_s"].get(name, 0.0)) for r in records]
        gpu = sum(s * int(r.get("gpus", 0)) for s, r in zip(seconds, records, strict=True))
        rows.append({"stage": name, "seconds": sum(seconds), "gpu_seconds": gpu,
                     "per_job_s": sum(seconds) / len(records) if records else float("nan")})  # fmt: skip
    table = pd.DataFrame(rows)
    wall = table.seconds.iloc[-1]
    return table.assign(share=table.seconds / wall if wall else float("nan"))


def write_costs(jobs: dict[str, list[str]], csv_path: str, md_path: str | None = None) -> None:
    """Where the model jobs' time went (their stage records), per kind of job, as CSV and Markdown."""
    costs, lines = study_costs(jobs)
    with atomic_path(csv_path) as tmp:
        costs.to_csv(tmp, index=False)
    sections = [f"{line}\n\n{costs[costs.jobs == name].drop(columns='jobs').to_markdown(index=False, floatfmt='.3g')}"
                for name, line in zip(costs.jobs.unique(), lines, strict=True)]  # fmt: skip
    with atomic_path(md_path or Path(csv_path).with_suffix(".md")) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n")
    print("\n".join(lines))
