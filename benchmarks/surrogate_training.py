"""What training a KVzap surrogate costs on a GPU: time per 1M training tokens.

    python benchmarks/surrogate_training.py --arch llama-3.1-8b --workdir /tmp/surrogate --output results.json

A model of a real architecture (benchmarks/configs/) with random bf16 weights is saved to local
disk (with a word-level tokenizer: the documents are random token ids, only the repeat request is
text), then `python -m kvsweep train_surrogate` runs as the workflow's job would, at the schema's
defaults (`surrogate:` block: documents, held-out documents, max_length, tokens per document, MLP
settings), once per surrogate type. Its stage record splits the job into imports, model load,
target collection (the model's forward passes over the repeat prompts) and the fit. Random weights
make the targets meaningless; the time is what a real model of this shape costs.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from job_overhead import save_assets, write_shard

from kvsweep.demo.model import build_tokenizer
from kvsweep.study.config import SCHEMA

from gpu_throughput import new_report


def surrogate_defaults() -> dict:
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    return {k: v["default"] for k, v in schema["properties"]["surrogate"]["properties"].items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--types", nargs="+", default=["mlp", "linear"])
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = surrogate_defaults()
    report = new_report(args.arch)
    report["settings"] = settings
    model, _, vocabulary = save_assets(args.arch, workdir)
    build_tokenizer(["Repeat the previous context exactly."]).save_pretrained(model)
    torch.cuda.empty_cache()
    documents = settings["documents"] + settings["validation_documents"]
    shard = workdir / "documents.jsonl"
    write_shard(shard, documents, settings["max_length"], vocabulary)
    report["runs"] = []
    for kind in args.types:
        output = workdir / f"surrogate_{kind}"
        command = [sys.executable, "-m", "kvsweep", "train_surrogate", f"--model={model}", "--dtype=bfloat16",
                   "--device=cuda", f"--data={shard}", f"--kvzap-type={kind}", f"--output={output}",
                   *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items() if k not in ("documents", "max_length"))]  # fmt: skip
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.time() - start
        if done.returncode != 0:
            report["runs"].append({"type": kind, "error": done.stderr[-3000:]})
            print(done.stderr[-3000:], flush=True)
            continue
        stages = json.loads((workdir / f"surrogate_{kind}.stages.json").read_text())
        tokens = stages["tokens_read"]
        row = {"type": kind, "wall_s_measured_outside": wall, **stages,
               "collect_s_per_1m_tokens": stages["collect_s"] / tokens * 1e6,
               "fit_s_per_1m_tokens": stages["fit_s"] / tokens * 1e6,
               "job_s_per_1m_tokens": stages["stages_s"]["model_work"] / tokens * 1e6}  # fmt: skip
        report["runs"].append(row)
        print(f"{kind}: {tokens} tokens read, collect {stages['collect_s']:.1f} s, fit {stages['fit_s']:.1f} s, "
              f"wall {wall:.1f} s; per 1M tokens: collect {row['collect_s_per_1m_tokens']:.0f} s, fit "
              f"{row['fit_s_per_1m_tokens']:.0f} s", flush=True)  # fmt: skip
        Path(args.output).write_text(json.dumps(report, indent=1))
    Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
