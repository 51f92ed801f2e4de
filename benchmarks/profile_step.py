"""Profile exact streaming (chunk 1): where do the milliseconds of one step go?

python benchmarks/profile_step.py --arch qwen3-8b --batch 8 --method baseline
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvsweep.stream_nll import stream_nll

from gpu_throughput import build_model, kvsweep_press


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="qwen3-8b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--methods", default="baseline,kvzap")
    args = parser.parse_args()
    model, surrogate = build_model(args.arch)
    docs = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens)).tolist()
    for method in args.methods.split(","):
        press = kvsweep_press(method, surrogate, 0.0)
        stream_nll(model, docs, 1, press)
        torch.cuda.synchronize()
        start = time.perf_counter()
        stream_nll(model, docs, 1, press)
        torch.cuda.synchronize()
        print(f"{method}: {(time.perf_counter() - start) / args.tokens * 1e3:.1f} ms per step", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            stream_nll(model, docs, 1, press)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
