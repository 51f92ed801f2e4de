"""Time one chunk-128 attention call of H2O's parts on a GPU, and the launch settings of its kernels.

    python benchmarks/attention_kernels_bench.py --arch qwen3-8b --output attention_kernels.json

Per batch size, on random bf16 tensors of the architecture's attention shape (128 queries, a pass
at keys 4,096 of a 5,120-key bucket, 30% of the keys evicted): the masked SDPA call every method
makes (`sdpa_masked`), the explicit-probabilities torch path H2O takes without Triton
(`torch_column_sums`, on top of the SDPA call), and `attend_and_accumulate` (both Triton kernels,
output included: it replaces the SDPA call) under each launch setting of one kernel with the
other's default. Milliseconds per call, median of CUDA-event timings.
"""

import argparse
import functools
import json
import statistics
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvsweep.engine import attention
from kvsweep.engine.layout import KeyVisibility
from kvsweep.kernels import attention as attention_kernels

CONFIGS = Path(__file__).parent / "configs"


def milliseconds(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_case(batch, heads, kv_heads, head_dim, q_len=128, key_stop=4096, k_len=5120, evicted_share=0.3):
    """Random bf16 queries, keys and values on the GPU, the pass's queries in the slots before
    `key_stop`, a share of the keys evicted; H2O's row weights and the stop as a tensor."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    cuda = {"device": "cuda", "dtype": torch.bfloat16}
    query = torch.randn(batch, q_len, heads, head_dim, generator=generator, **cuda).transpose(1, 2)
    key = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, **cuda)
    value = torch.randn_like(key)
    slots = torch.arange(key_stop - q_len, key_stop, device="cuda")
    evicted = torch.rand(batch, kv_heads, k_len, device="cuda", generator=generator) < evicted_share
    seen = KeyVisibility(evicted, torch.arange(k_len, device="cuda").repeat(batch, 1), slots)
    weights = torch.full((batch, q_len), kv_heads / heads, device="cuda")
    return query, key, value, seen, weights, torch.tensor([key_stop], device="cuda")


def folded(query, key):
    """(batch, heads, q, d) queries folded over their KV heads: (batch, kv_heads, groups * q, d)."""
    batch, heads, q_len, head_dim = query.shape
    return query.reshape(batch, key.shape[1], heads // key.shape[1] * q_len, head_dim)


def sdpa_masked(query, key, value, visible):
    return attention.masked_sdpa(folded(query, key), key, value, visible)


def torch_column_sums(query, key, visible, weights, received):
    """H2O's torch path without its P·V product."""
    probs = attention.masked_probabilities(folded(query, key), key, visible, query.shape[-1] ** -0.5)
    received += attention.weighted_column_sums(probs, weights)


# Launch settings tried per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages).
LAUNCHES = {
    "forward": [
        (64, 64, 4, 3),
        (64, 32, 4, 3),
        (64, 128, 8, 2),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 128, 8, 2),
        (128, 128, 4, 2),
        (32, 64, 4, 2),
    ],
    "column_sums": [
        (64, 128, 4, 3),
        (128, 128, 4, 2),
        (128, 128, 8, 2),
        (64, 128, 8, 3),
        (64, 64, 4, 3),
        (32, 128, 4, 2),
        (128, 64, 8, 3),
        (64, 256, 8, 2),
    ],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen3-8b")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    spec = json.loads((CONFIGS / f"{args.arch}.json").read_text())
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    head_dim = spec.get("head_dim") or spec["hidden_size"] // heads
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "arch": args.arch, "batches": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        row = time_batch(batch, heads, kv_heads, head_dim)
        report["batches"][batch] = row
        best = {name: row[name][0] for name in ("forward", "column_sums")}
        print(json.dumps({"batch": batch, **{k: v for k, v in row.items() if k not in best}, "best": best}), flush=True)
        Path(args.output).write_text(json.dumps(report, indent=1))


def time_batch(batch, heads, kv_heads, head_dim) -> dict:
    query, key, value, seen, weights, stop = attention_case(batch, heads, kv_heads, head_dim)
    visible = seen.dense(key.shape[2])  # what the torch paths build
    received = torch.zeros(batch, kv_heads, key.shape[2], device="cuda")

    def kernels(**launches):
        attention_kernels.attend_and_accumulate(
            query, key, value, seen, weights, head_dim**-0.5, received, stop, **launches
        )

    row = {
        "sdpa_masked": milliseconds(lambda: sdpa_masked(query, key, value, visible)),
        "torch_column_sums": milliseconds(lambda: torch_column_sums(query, key, visible, weights, received)),
        "kernels_default": milliseconds(kernels),
    }
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                row[f"sdpa_masked_{backend.name}"] = milliseconds(lambda: sdpa_masked(query, key, value, visible))
        except Exception as err:  # noqa: BLE001 (a backend this card or build lacks)
            row[f"sdpa_masked_{backend.name}"] = repr(err)[:120]
    for name in ("forward", "column_sums"):
        timings = []
        for m, n, w, stages in LAUNCHES[name]:
            launch = {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": stages}
            try:
                ms = milliseconds(functools.partial(kernels, **{f"{name}_launch": launch}))
            except Exception as err:  # noqa: BLE001 (a setting that does not fit the card is skipped)
                timings.append({**launch, "error": repr(err)[:120]})
                continue
            timings.append({**launch, "ms": ms})
        row[name] = sorted(timings, key=lambda t: t.get("ms", float("inf")))
    return row


if __name__ == "__main__":
    main()
