"""Compares the job outputs of `multi_gpu_jobs.sh`: one GPU against two, field by field."""

import json
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results_of(row: dict) -> dict:
    """Everything a job wrote for a document but its provenance (device, versions)."""
    return {key: value for key, value in row.items() if key != "provenance"}


def main(work: str, report_path: str) -> None:
    work = Path(work)
    report = {"jobs": {}, "refusals": {}}
    for one in sorted((work / "gpus1").glob("*/*.jsonl")):
        two = work / "gpus2" / one.relative_to(work / "gpus1")
        a, b = rows(one), rows(two)
        same = [results_of(x) == results_of(y) for x, y in zip(a, b, strict=True)]
        stages = json.loads(two.with_name(two.stem + ".stages.json").read_text()) if two.with_name(
            two.stem + ".stages.json").exists() else {}  # fmt: skip
        report["jobs"][str(one.relative_to(work / "gpus1"))] = {
            "documents": len(a), "identical_documents": sum(same), "gpus_recorded_split": stages.get("gpus"),
            "kv_density": sum(r["kv_kept"] for r in b) / sum(r["kv_total"] for r in b),
            "max_abs_nll_diff": max(abs(x.get("nll_sum", 0) - y.get("nll_sum", 0)) for x, y in zip(a, b, strict=True)),
        }  # fmt: skip
    for gpus in (1, 2):
        validation = json.loads((work / f"gpus{gpus}" / "surrogate" / "validation.json").read_text())
        report[f"surrogate_gpus{gpus}"] = {k: validation[k] for k in ("mean_r2", "mean_spearman", "training_positions")}
    for name in ("too_few_visible",):
        report["refusals"][name] = (work / f"{name}.txt").read_text().strip().splitlines()[-3:]
    Path(report_path).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
