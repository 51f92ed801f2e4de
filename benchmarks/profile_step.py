"""Profile small-chunk work: where do the milliseconds of one step go?

    python benchmarks/profile_step.py --arch qwen3-8b --workload chunk1 --batch 8 --methods baseline,kvzap
    python benchmarks/profile_step.py --arch qwen3-8b --workload decode --batch 1 --context 8192
    python benchmarks/profile_step.py --arch llama-3.1-8b --workload chunk128 --batch 8 --context 8192 --profile

`chunk1` times exact streaming per step; `chunk128` times streaming in chunks of 128 over
`--context` tokens (per pass); `decode` times generation's prefill alone (one new
token) and prefill + `--new` tokens, so the decoding steps' cost is the difference. Each timing is
taken twice (the first includes first-touch costs). Then the profiler's top kernels, with
`--profile`, for a shorter run of the same workload.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from kvsweep.engine.generate import stream_generate
from kvsweep.engine.passes import ReusablePasses
from kvsweep.engine.stream_nll import stream_nll

from gpu_throughput import build_model, kvsweep_press, timed


def seconds(fn) -> float:
    return timed(fn)[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="qwen3-8b")
    parser.add_argument("--workload", choices=["chunk1", "chunk128", "decode"], default="chunk1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="chunk1: tokens streamed")
    parser.add_argument("--context", type=int, default=8192, help="decode: prompt tokens; chunk128: tokens streamed")
    parser.add_argument("--new", type=int, default=256, help="decode: new tokens")
    parser.add_argument("--methods", default="baseline,kvzap,h2o")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-tokens", type=int, default=2048, help="chunk128 and decode: prompt tokens profiled")
    parser.add_argument("--kept", action="store_true", help="reuse each method's passes across calls, as a job does")
    parser.add_argument("--name-width", type=int, default=70, help="characters of kernel names in the profile table")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed in the profile table")
    args = parser.parse_args()
    model, surrogate = build_model(args.arch)
    vocab = model.config.vocab_size
    thresholds = {"baseline": None, "kvzap": 0.0, "h2o": 2e-4}
    for method in args.methods.split(","):
        press = kvsweep_press(method, surrogate, thresholds[method])
        # With --kept, calls of one shape share their passes and graphs (`ReusablePasses`), as a
        # workflow job's batches do: the timings after the first are free of graph captures.
        kept = {"reuse": ReusablePasses()} if args.kept else {}
        if args.workload == "chunk1":
            docs = torch.randint(0, vocab, (args.batch, args.tokens)).tolist()
            for attempt in range(2):
                took = seconds(lambda: stream_nll(model, docs, 1, press, **kept))  # noqa: B023
                print(
                    f"{method} chunk1 b{args.batch} try {attempt}: {took / args.tokens * 1e3:.2f} ms/step", flush=True
                )
            short = lambda: stream_nll(model, [d[:64] for d in docs], 1, press, **kept)  # noqa: B023, E731
        elif args.workload == "chunk128":
            docs = torch.randint(0, vocab, (args.batch, args.context)).tolist()
            for attempt in range(3):
                took = seconds(lambda: stream_nll(model, docs, 128, press, **kept))  # noqa: B023
                print(f"{method} chunk128 b{args.batch} try {attempt}: {args.batch * args.context / took:.0f} tok/s, "
                      f"{took / (args.context / 128) * 1e3:.1f} ms/pass", flush=True)  # fmt: skip
            short = lambda: stream_nll(model, [d[: args.profile_tokens] for d in docs], 128, press, **kept)  # noqa: B023, E731
        else:
            prompts = torch.randint(0, vocab, (args.batch, args.context)).tolist()
            # The prefill-only call has another shape (capacity): its own kept passes, so that
            # neither call throws the other's away.
            kept_prefill = {"reuse": ReusablePasses()} if args.kept else {}
            for attempt in range(2):
                prefill = seconds(lambda: stream_generate(model, prompts, 128, 1, press, **kept_prefill))  # noqa: B023
                full = seconds(lambda: stream_generate(model, prompts, 128, args.new, press, **kept))  # noqa: B023
                per_step = (full - prefill) / (args.new - 1) * 1e3
                print(f"{method} decode b{args.batch} try {attempt}: prefill {prefill:.2f} s, "
                      f"prefill + {args.new} new {full:.2f} s, {per_step:.2f} ms per decoding step", flush=True)  # fmt: skip
            short = lambda: stream_generate(model, [p[: args.profile_tokens] for p in prompts], 128, 64, press, **kept)  # noqa: B023, E731
        if args.profile:
            short()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                short()
                torch.cuda.synchronize()
            print(
                prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=args.name_width
                )
            )


if __name__ == "__main__":
    main()
