"""GPU throughput of the reference-point methods (StreamingLLM, random, Expected Attention, key
norm, observed attention) beside the uncompressed baseline, in one process.

    python benchmarks/methods_throughput.py --arch llama-3.1-8b --output results.json

Random bf16 weights of a real architecture (benchmarks/configs/). Workloads: chunk 128 over 8,192
tokens and chunk 1 (exact streaming) over 1,024 tokens, batch 8. Each method is built from the
registry with its default settings; its threshold is set to the median of its own decision scores
on a probe stream (about half the compressible cache evicted; random: 0.5). Before timing, on the
card: threshold -inf reproduces the baseline, and CUDA-graph replay reproduces eager passes (same
NLL, same kept counts). Results are written after every measurement.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from kvsweep.engine.methods import build_press
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.study.methods import get_method

from gpu_throughput import build_model, floor_tokens_per_s, new_report, timed

METHODS = ("streaming_llm", "random", "knorm", "expected_attention", "observed_attention")


def press_for(method: str, threshold: float | None):
    spec = get_method(method)
    settings = spec.resolve(threshold if spec.takes_threshold else None, {})
    return build_press(spec, threshold if spec.takes_threshold else None, settings)


def median_threshold(model, method: str, docs) -> float:
    """The median of the method's decision scores when nothing is evicted."""
    if method == "random":
        return 0.5
    press = press_for(method, -math.inf)
    press.record_decisions = True
    results = stream_nll(model, docs, 128, press, return_decision_scores=True)
    scores = np.concatenate([r["decision_scores"].ravel() for r in results])
    return float(np.median(scores[np.isfinite(scores)]))


def worst_rel_diff(a, b) -> float:
    return max(abs(x["nll_sum"] - y["nll_sum"]) / abs(y["nll_sum"]) for x, y in zip(a, b, strict=True))


def expected_attention_kernel_check() -> dict:
    """On the card, bf16 keys: the Triton kernel's logits and the torch path's against float64."""
    from kvsweep.engine.scorers.expected_attention import expected_logits_torch
    from kvsweep.kernels import expected_logits as expected_attention_kernel

    g = torch.Generator(device="cuda").manual_seed(3)
    batch, kv_heads, group, n, d = 2, 8, 4, 3000, 128
    keys = torch.randn(batch, kv_heads, n, d, generator=g, device="cuda").to(torch.bfloat16)
    mean = torch.randn(batch, kv_heads * group, d, generator=g, device="cuda") / d**0.5
    spread = torch.randn(batch, kv_heads * group, d, d, generator=g, device="cuda") / d
    covariance = spread @ spread.transpose(-1, -2) / (2 * d)
    exact = keys.double()[:, :, None] @ mean.double().view(batch, kv_heads, group, d, 1)
    quad = (keys.double()[:, :, None] @ covariance.double().view(batch, kv_heads, group, d, d)) * keys.double()[
        :, :, None
    ]
    exact = (exact.squeeze(-1) + quad.sum(-1)).permute(0, 1, 3, 2)  # (batch, kv_heads, n, group)
    kernel = expected_attention_kernel.expected_logits(
        keys, mean.view(batch, kv_heads, group, d), covariance.view(batch, kv_heads, group, d, d)
    )
    torch_path = expected_logits_torch(keys, mean, covariance)
    scale = exact.abs().max().item()
    return {
        "expected_attention_kernel_vs_float64_max_abs_logit_diff_over_max_bf16": (kernel - exact).abs().max().item()
        / scale,
        "expected_attention_torch_vs_float64_max_abs_logit_diff_over_max_bf16": (torch_path - exact).abs().max().item()
        / scale,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=500)
    args = parser.parse_args()
    began = time.time()
    report = new_report(args.arch)
    model, _ = build_model(args.arch)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, vocab, (2, 1024), generator=generator).tolist()
    thresholds = {m: median_threshold(model, m, probe) for m in METHODS if get_method(m).takes_threshold}
    report["thresholds"] = thresholds

    def save():
        Path(args.output).write_text(json.dumps(report, indent=1))

    reference = stream_nll(model, probe, 128)
    checks = {}
    for method in METHODS:
        if get_method(method).takes_threshold:
            results = stream_nll(model, probe, 128, press_for(method, -math.inf))
            checks[f"{method}_minus_inf_vs_baseline_max_rel_nll_diff_bf16"] = worst_rel_diff(results, reference)
        short = [doc[:200] for doc in probe]
        press = press_for(method, thresholds.get(method))
        graphs = stream_nll(model, short, 1, press, key_bucket=64)
        eager = stream_nll(model, short, 1, press, cuda_graphs=False, key_bucket=64)
        checks[f"{method}_chunk1_graphs_vs_eager_max_rel_nll_diff"] = worst_rel_diff(graphs, eager)
        checks[f"{method}_chunk1_graphs_vs_eager_same_kv_kept"] = [r["kv_kept"] for r in graphs] == [
            r["kv_kept"] for r in eager
        ]
    checks.update(expected_attention_kernel_check())
    report["checks"] = checks
    print(json.dumps({k: report[k] for k in ("card", "floors", "thresholds", "checks")}), flush=True)
    save()

    for workload, n_tokens, chunk in (("chunk128", 8192, 128), ("chunk1", 1024, 1)):
        docs = torch.randint(0, vocab, (args.batch, n_tokens), generator=generator).tolist()
        floor = floor_tokens_per_s(model, report["floors"], args.batch, n_tokens, chunk)
        baseline_rate = None
        for method in ("baseline", *METHODS):
            if time.time() - began > args.budget_s:
                report.setdefault("skipped", []).append(f"{workload} {method}")
                continue
            press = None if method == "baseline" else press_for(method, thresholds.get(method))
            stream_nll(model, [d[: 2 * chunk + 3] for d in docs], chunk, press)  # captures the graphs
            results, seconds, peak = timed(lambda: stream_nll(model, docs, chunk, press))  # noqa: B023
            rate = args.batch * n_tokens / seconds
            baseline_rate = baseline_rate or rate
            run = {
                "workload": workload, "tokens": n_tokens, "chunk": chunk, "batch": args.batch, "method": method,
                "tok_per_s": rate, "seconds": seconds, "peak_GiB": peak, "vs_baseline": rate / baseline_rate,
                "floor_tok_per_s": floor, "fraction_of_floor": rate / floor,
                "kv_density_compressible": sum(r["kv_kept_compressible"] for r in results)
                / max(1, sum(r["kv_total_compressible"] for r in results)),
            }  # fmt: skip
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
            save()
    report["wall_s"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
