"""Time the attention kernels' launch settings on the passes that leave a GPU idle: batch 1 and
decoding. Which key block and how many key shares suit a pass whose programs are few?

    python benchmarks/launch_sweep.py --arch llama-3.1-8b --output launch_sweep.json

Random bf16 tensors of the architecture's attention shape, keys in a static cache as the engine
holds them (the pass's queries in consecutive slots, nothing evicted). Per case:
- `forward`: `attend` (the forward kernel and, with shares, their combination) per forward
  setting and key share (`split_keys`; "auto" is `kvsweep.kernels.launches.key_splits`'s choice);
- `column_sums`: `attend_and_accumulate` with H2O's in-kernel row weights and stop, the sums of
  keys decided before the pass skipped (a 512-key window), per column-sum setting, with the
  default forward: the differences between settings are the column sums'. Unlike the engine
  (`kvsweep.engine.attention`), it passes no `undecided_span` or `sums_from`: whole rows a program and
  every key block launched, as the kernel ran when this sweep chose its blocks.
Microseconds of GPU time per call: 20 calls captured in a CUDA graph, as the engine replays its
passes (timed eagerly, the host's launches would be measured instead), median of 20 replays.
"""

import argparse
import json
from pathlib import Path

import torch
from attention_kernels_bench import attention_case, milliseconds

from kvsweep.kernels import attention as attention_kernels
from kvsweep.kernels import launches as kernel_launches

CONFIGS = Path(__file__).parent / "configs"
FORWARD_SETTINGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
]
COLUMN_SETTINGS = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
]
WINDOW = 512


def microseconds(fn, calls: int = 20, repeats: int = 20) -> float:
    """GPU time of one call: `calls` calls captured in a CUDA graph (as the engine replays its
    passes), so the host's launch time is not measured; median over `repeats` replays."""
    for _ in range(3):  # compile, warm up
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return milliseconds(graph.replay, repeats) * 1e3 / calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads((CONFIGS / f"{args.arch}.json").read_text())
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    head_dim = spec.get("head_dim") or spec["hidden_size"] // heads
    report = {"card": torch.cuda.get_device_name(), "arch": args.arch, "window": WINDOW, "cases": []}
    passes = [  # (name, batch, queries, key stop, cache slots)
        ("decode_b1_8192", 1, 1, 8192, 8448),
        ("decode_b8_8192", 8, 1, 8192, 8448),
        ("chunk128_b1_4096", 1, 128, 4096, 6144),
        ("chunk128_b1_8192", 1, 128, 8192, 10240),
        ("chunk128_b8_4096", 8, 128, 4096, 6144),
        ("chunk1_b8_1024", 8, 1, 1024, 1280),
    ]
    scaling = head_dim**-0.5
    for name, batch, q_len, key_stop, k_len in passes:
        query, key, value, seen, *_ = attention_case(
            batch, heads, kv_heads, head_dim, q_len, key_stop, k_len, evicted_share=0.0
        )
        row = {"case": name, "batch": batch, "q_len": q_len, "key_stop": key_stop, "forward": [], "column_sums": []}
        for launch in FORWARD_SETTINGS:
            for split in ["auto", 128, 256, 512, 1024, 2048]:
                if split != "auto" and split % launch["BLOCK_N"]:
                    continue
                options = {"forward_launch": launch, "stop_after_last_query": True}
                if split != "auto":
                    options["split_keys"] = split
                us = microseconds(lambda: attention_kernels.attend(query, key, value, seen, scaling, **options))  # noqa: B023
                row["forward"].append({**launch, "split_keys": split, "us": round(us, 2)})
        tokens_before = torch.full((batch,), key_stop - q_len, device="cuda")
        received = torch.zeros(batch, kv_heads, k_len, device="cuda")
        default = kernel_launches.choose_launches(query, heads // kv_heads * q_len)
        for launch in COLUMN_SETTINGS:

            def call():
                attention_kernels.attend_and_accumulate(
                    query, key, value, seen, None, scaling, received, column_sums_launch=launch,  # noqa: B023
                    stop_after_last_query=True, undecided_from=tokens_before, undecided_offset=-WINDOW,  # noqa: B023
                )  # fmt: skip

            row["column_sums"].append({**launch, "us": round(microseconds(call), 2), "default": launch == default[1]})
        report["cases"].append(row)
        best_forward = min(row["forward"], key=lambda r: r["us"])
        best_columns = min(row["column_sums"], key=lambda r: r["us"])
        chosen = [r["us"] for r in row["forward"] if r["split_keys"] == "auto" and r["BLOCK_N"] == default[0]["BLOCK_N"]
                  and r["BLOCK_M"] == default[0]["BLOCK_M"] and r["num_stages"] == default[0]["num_stages"]]  # fmt: skip
        print(name, "forward best", best_forward, "default setting, auto split:", chosen, flush=True)
        print(name, "with sums best", best_columns, "all:", [r["us"] for r in row["column_sums"]], flush=True)
        args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
