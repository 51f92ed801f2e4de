"""Whole evaluation jobs on a GPU: where their wall time goes, and the model's share of it.

    python benchmarks/job_overhead.py --arch llama-3.1-8b --workdir /tmp/job_overhead --output results.json

A model of a real architecture (benchmarks/configs/) with random bf16 weights and a random KVzap
MLP surrogate are saved to local disk, read once (so the weights are in the file cache, as for
every job of a study but the first on a node), then `python -m kvsweep evaluate` runs as a
workflow job would: one process per job, at the shipped study's settings (config.yaml: chunk,
batch, max_length, its first shard: the documents that `dataset.shard_tokens` gives, at most
`max_documents`; each method's first explicit threshold and its settings). Each job's stage record (`kvsweep.core.timing`) is read back beside the
wall time measured around the process. Checked on the card first: a job's batches sharing their
passes and CUDA graphs (`ReusablePasses`) give what fresh passes give. Also timed: one job per method on the old default shard
(10 documents), and the model's load from disk with the old path (read into host memory, then
copied to the GPU) against `device_map` (straight to the GPU). Results are written after every
job.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from kvsweep.engine.methods import build_press
from kvsweep.study.config import documents_per_shard, method_settings, validate_config

from gpu_throughput import build_model, new_report

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"fixed_cost_s": 8.0, "model_work_share": 0.85}

LOAD = """
import sys, time, torch
from transformers import AutoModelForCausalLM
start = time.perf_counter()
if sys.argv[2] == "host_then_copy":
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).to("cuda")
else:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


def save_assets(arch: str, workdir: Path) -> tuple[Path, Path, int]:
    model, surrogate = build_model(arch)
    vocabulary = model.config.vocab_size
    model.save_pretrained(workdir / "model")
    surrogate.save_pretrained(workdir / "surrogate")
    del model, surrogate
    torch.cuda.empty_cache()
    for path in (workdir / "model").rglob("*"):  # into the file cache
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    return workdir / "model", workdir / "surrogate", vocabulary


def write_shard(path: Path, documents: int, length: int, vocabulary: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for i in range(documents):
            ids = torch.randint(0, vocabulary, (length,), generator=generator).tolist()
            fh.write(json.dumps({"id": f"doc{i:04d}", "input_ids": ids}) + "\n")


def method_flags(config: dict, name: str, surrogate: Path) -> list[str]:
    """The shipped study's arguments for one method entry: its first explicit threshold and its
    settings as the workflow passes them, with the saved random surrogate."""
    settings = method_settings(config, name)
    if "kvzap_surrogate" in settings:
        settings["kvzap_surrogate"] = str(surrogate)
    values = config["methods"][name].get("canonical_values") or []
    flags = [f"--method={name}", *(f"--threshold={values[0]}" for _ in values[:1])]
    return flags + [f"--{key.replace('_', '-')}={value}" for key, value in settings.items() if value is not None]


def run_job(args, config, model, surrogate, shard, method, label, workdir) -> dict:
    output = workdir / "out" / label / "shard000.jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "kvsweep", "evaluate", f"--model={model}", f"--data={shard}",
        *method_flags(config, method, surrogate), f"--chunk-size={config['chunk_size']}",
        f"--max-length={config['dataset']['max_length']}", f"--batch-size={config['batch_size']}",
        "--device=cuda", f"--dtype={config['model']['dtype']}", f"--output={output}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "5"}
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.time() - start
    if result.returncode != 0:
        return {"label": label, "method": method, "error": result.stderr[-3000:]}
    record = json.loads(output.with_name("shard000.stages.json").read_text())
    fixed = record["wall_s"] - record["stages_s"]["model_work"]
    return {
        "label": label,
        "method": method,
        "documents": record["documents"],
        "tokens": record["tokens"],
        "wall_s_measured_outside": wall,
        "wall_s_recorded": record["wall_s"],
        "stages_s": record["stages_s"],
        "fixed_cost_s": fixed,
        "model_work_share": record["model_work_share"],
        "model_tokens_per_s": record["tokens"] / record["stages_s"]["model_work"],
    }


def kept_passes_check(config, model_dir: Path, surrogate: Path, vocabulary: int) -> dict:
    """On the card, with CUDA graphs: three batches of documents of different lengths (700-1,024
    tokens: one shape, whole key buckets) streamed through one job's `ReusablePasses` give what fresh
    passes give (NLL within bf16 noise, identical kept counts), per method."""
    from kvsweep.engine.models import load_model
    from kvsweep.engine.passes import ReusablePasses
    from kvsweep.engine.stream_nll import stream_nll
    from kvsweep.study.methods import get_method

    model = load_model(str(model_dir), config["model"]["dtype"], "cuda")
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, vocabulary, (config["batch_size"], 1024), generator=generator).tolist() for _ in range(3)
    ]
    checks = {}
    for method in ("baseline", "kvzap", "h2o"):
        settings = method_settings(config, method)
        if "kvzap_surrogate" in settings:
            settings["kvzap_surrogate"] = str(surrogate)
        values = config["methods"][method].get("canonical_values") or [None]
        threshold = None if values[0] is None else float(values[0])
        spec = get_method(method)
        kept, worst, counts_equal = ReusablePasses(), 0.0, True
        press = build_press(spec, threshold, spec.resolve(threshold, settings))
        for documents in batches:
            a = stream_nll(model, documents, config["chunk_size"], press, reuse=kept)
            b = stream_nll(
                model, documents, config["chunk_size"], build_press(spec, threshold, spec.resolve(threshold, settings))
            )
            worst = max(
                [worst, *(abs(x["nll_sum"] - y["nll_sum"]) / abs(y["nll_sum"]) for x, y in zip(a, b, strict=True))]
            )
            counts_equal &= all(x["kv_kept"] == y["kv_kept"] for x, y in zip(a, b, strict=True))
        checks[method] = {"worst_rel_nll_diff": worst, "kept_counts_equal": counts_equal, "reused": kept.reused}
        print(
            f"kept passes vs fresh, {method}: worst rel NLL diff {worst:.2e}, kept counts equal {counts_equal}",
            flush=True,
        )
    del model
    torch.cuda.empty_cache()
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"), help="the study whose settings a job uses")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--old-shard-size", type=int, default=10)
    parser.add_argument("--check-only", action="store_true", help="only the on-card check of kept passes")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = validate_config(yaml.safe_load(Path(args.config).read_text()))

    report = new_report(args.arch)
    started = time.time()
    model, surrogate, vocabulary = save_assets(args.arch, workdir)
    report["save_s"] = time.time() - started
    size = min(documents_per_shard(config), config["dataset"]["max_documents"])  # the study's first shard
    length = config["dataset"]["max_length"]
    report["shipped"] = {"documents_per_shard": size, "max_length": length, "chunk_size": config["chunk_size"],
                         "batch_size": config["batch_size"], "goals": GOALS}  # fmt: skip
    shards = {"shipped": workdir / "shipped.jsonl", "old": workdir / "old.jsonl"}
    write_shard(shards["shipped"], size, length, vocabulary)
    write_shard(shards["old"], args.old_shard_size, length, vocabulary)

    def save():
        Path(args.output).write_text(json.dumps(report, indent=1))

    for attempt in range(2):  # the imports of a job, alone (the second with the file cache warm)
        start = time.time()
        subprocess.run([sys.executable, "-c", "import kvsweep.engine.press, kvsweep.engine.models"],
                       check=True)  # fmt: skip
        report[f"imports_s_{attempt}"] = time.time() - start
        print(f"imports alone: {report[f'imports_s_{attempt}']:.1f} s", flush=True)
    for way in ("host_then_copy", "device_map"):
        seconds = subprocess.run([sys.executable, "-c", LOAD, str(model), way], capture_output=True, text=True,
                                 check=True).stdout.split()[-1]  # fmt: skip
        report[f"load_s_{way}"] = float(seconds)
        print(f"model load, {way}: {float(seconds):.1f} s", flush=True)
        save()

    report["kept_passes_check"] = kept_passes_check(config, model, surrogate, vocabulary)
    save()
    if args.check_only:
        return
    methods = [m for m in ("baseline", "kvzap", "h2o") if m in config["methods"]]
    for shard in ("shipped", "old"):
        for method in methods:
            row = run_job(args, config, model, surrogate, shards[shard], method, f"{method}_{shard}", workdir)
            row["shard"] = shard
            report["runs"].append(row)
            save()
            if "error" in row:
                print(f"{row['label']}: failed\n{row['error']}", flush=True)
                continue
            stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages_s"].items())
            print(f"{row['label']}: {row['documents']} docs, wall {row['wall_s_measured_outside']:.1f} s "
                  f"(recorded {row['wall_s_recorded']:.1f}), fixed {row['fixed_cost_s']:.1f} s, model share "
                  f"{row['model_work_share']:.0%}, {row['model_tokens_per_s']:.0f} tok/s | {stages}", flush=True)  # fmt: skip
    save()


if __name__ == "__main__":
    main()
