"""What compression buys in kvpress's protocol: the KV memory and the decoding speed of the
compacting cache (`kvsweep.engine.compaction`) against the uncompressed baseline, and its
prefill against the masked engine's.

    python benchmarks/kv_memory.py --arch llama-3.1-8b --output kv_memory.json \
        [--workloads 32768x1,32768x8,8192x32] [--densities 0.5,0.25,0.1] [--budget-s 540]

Random bf16 weights (`gpu_throughput.build_model`), random token contexts, a 16-token question,
`--new-tokens` (512) greedy tokens; the compacting engine prefills `--prefill-batch` (1) contexts
at a time, each compacted before the next (the masked engine prefills the whole batch at once). Per workload (context tokens x batch): the baseline (masked,
nothing evicted) and `kvzap` and `h2o` at each density d, i.e. kvpress's compression ratio 1 - d
(per KV head, no window, no sinks: `ScorerPress`'s budget), each through `compress_once_generate`
with the compacting cache. Per row:

- `kv_GiB`: the keys and values the cache holds while answering (every layer; the compacted cache
  is as wide as the widest (layer, document, head) keeps, plus the question's and the answer's
  slots), `kv_memory_vs_baseline` its share of the baseline's, and `kv_memory_bound`: 1.15 x d x
  the baseline's context share, plus the question's and answer's slots (the issue's goal);
- `decode_tok_s`: the answer's tokens per second after the first (the call less its prefill and
  the decoding graph's capture), `decode_vs_baseline`, and `decode_floor_share`: the share of
  the bandwidth floor (every weight and the cache's keys and values read once per step);
- `prefill_s` (the context's pass, the decision, the compaction and the question's pass),
  `prefill_vs_baseline`, and `prefill_vs_masked` (at `--masked-prefill` densities): against the
  same press on the masked engine (the cache kept whole), the cost of compacting;
- `peak_GiB`: the most memory allocated during the call (weights included): the context's pass
  holds the whole context's cache before it is compacted, so this is the prefill's peak;
- `largest_batch_estimate` (with `--prefill-batch 1`): the most documents of this length the GPU
  holds at this point, from this run's memory: the weights, one context's pass (the peak less the
  weights and the compacted caches) and one compacted cache per document;
- rows that do not fit say `"error": "out of memory"`.

Rows are written after each measurement, so a run cut short keeps what it measured.
"""

import argparse
import contextlib
import functools
import json
import time
from pathlib import Path

import torch

from kvsweep.core.timing import StageClock
from kvsweep.engine import compress_once
from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.scorers import H2OScorer, KVzapScorer

from gpu_throughput import build_model, new_report, timed


def ratio_press(method: str, surrogate, density: float) -> StreamingThresholdPress | None:
    """kvpress's budget at compression ratio 1 - density: per KV head, no window, no sinks."""
    if method == "baseline":
        return None
    if method == "h2o":
        scorer = H2OScorer()
    else:
        scorer = KVzapScorer(model_type="mlp", surrogate="random-surrogate")
        scorer.kvzap_model, scorer.kvzap_model_name = surrogate, "random-surrogate"
    return StreamingThresholdPress(scorer, threshold=0.0, sliding_window_size=0, fixed_ratio=round(1 - density, 6))


def watched_call(call, *args):
    """Run `call(*args)` (one `compress_once_generate`); returns its value, the bytes of the KV
    cache its answer was decoded over (the compacted cache, or the masked whole), and the seconds
    its prefill took (`compress_once._prefilled`: the contexts' passes, the decision, the
    compaction, the question's pass)."""
    seen = []
    prefilled = compress_once._prefilled

    @contextlib.contextmanager
    def watched(*inner, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with prefilled(*inner, **kwargs) as state:
            torch.cuda.synchronize()
            seen.append((state.passes.kv_bytes(), time.perf_counter() - start))
            yield state

    compress_once._prefilled = watched
    try:
        return (call(*args), *seen[-1])
    finally:
        compress_once._prefilled = prefilled


def decode_floor_seconds(model, floors, kv_bytes: int) -> float:
    """One decoding step's bandwidth floor: every weight but the input embedding's (one row per
    token) and the whole cache read once."""
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - embedding.nbytes
    return (weights + kv_bytes) / (floors["copy_TBps"] * 1e12)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--workloads", default="32768x1,32768x8,8192x32", help="context tokens x batch, comma-separated"
    )
    parser.add_argument("--densities", default="0.5,0.25,0.1")
    parser.add_argument("--methods", default="kvzap,h2o")
    parser.add_argument("--question", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prefill-batch", type=int, default=1, help="contexts per prefill pass, compacting")
    parser.add_argument("--masked-prefill", default="0.25", help="densities also timed on the masked engine")
    parser.add_argument("--budget-s", type=float, default=540, help="start no new workload after this")
    args = parser.parse_args()

    began = time.perf_counter()
    report = new_report(args.arch)
    report.update(question=args.question, new_tokens=args.new_tokens, protocol="kvpress", rows=report.pop("runs"))
    model, surrogate = build_model(args.arch)
    weights_GiB = torch.cuda.memory_allocated() / 2**30
    report["weights_GiB"] = weights_GiB
    gpu_GiB = torch.cuda.mem_get_info()[1] / 2**30
    report["gpu_GiB"] = gpu_GiB
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def save():
        Path(args.output).write_text(json.dumps(report, indent=1))

    def generate_for(contexts, questions):
        def generate(press, new_tokens, compact, clock):
            grouped = {"prefill_batch": args.prefill_batch} if compact else {}
            return compress_once.compress_once_generate(
                model, contexts, questions, new_tokens, press, compact=compact, clock=clock, **grouped
            )

        return generate

    # Kernels compiled once, on a small batch, before anything is timed.
    small = torch.randint(0, vocab, (2, 2048), generator=generator).tolist()
    generate = generate_for(small, [q[:16] for q in small])
    for method in ["baseline", *args.methods.split(",")]:
        for compact in (False, True):
            generate(ratio_press(method, surrogate, 0.5), 4, compact, None)
    masked_at = [float(d) for d in args.masked_prefill.split(",") if d]

    for workload in args.workloads.split(","):
        if time.perf_counter() - began > args.budget_s:
            report.setdefault("skipped", []).append(workload)
            continue
        tokens, batch = (int(x) for x in workload.split("x"))
        ids = torch.randint(0, vocab, (batch, tokens + args.question), generator=generator)
        contexts = [row[:tokens].tolist() for row in ids]
        questions = [row[tokens:].tolist() for row in ids]
        generate = generate_for(contexts, questions)
        baseline = None
        points = [("baseline", 1.0)] + [
            (method, float(d)) for method in args.methods.split(",") for d in args.densities.split(",")
        ]
        for method, density in points:
            row = {"method": method, "density": density, "tokens": tokens, "batch": batch}
            press = ratio_press(method, surrogate, density)
            if method == "baseline" or density in masked_at:  # the masked engine's prefill
                try:
                    _, masked_bytes, masked_s = watched_call(generate, press, 1, False, None)
                    row.update(masked_kv_GiB=masked_bytes / 2**30, masked_prefill_s=masked_s)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row["masked_error"] = "out of memory"
            try:
                clock = StageClock()
                clock.synchronize = torch.cuda.synchronize
                (results, seconds, peak), kv_bytes, prefill_s = watched_call(
                    timed, functools.partial(generate, press, args.new_tokens, True, clock)
                )
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                report["rows"].append({**row, "error": "out of memory"})
                save()
                continue
            steps = args.new_tokens - 1
            # The call less its prefill and the decoding graph's capture (its first step's pass is eager).
            capture_s = clock.seconds["graph_capture"]
            decode_s = seconds - prefill_s - capture_s
            row.update(
                kv_GiB=kv_bytes / 2**30, peak_GiB=peak, prefill_s=prefill_s, capture_s=capture_s,
                decode_s=decode_s, decode_tok_s=batch * steps / decode_s,
                decode_floor_share=decode_floor_seconds(model, report["floors"], kv_bytes) * steps / decode_s,
                kept_share=sum(r["kv_kept"] for r in results) / sum(r["kv_total"] for r in results),
                n_generated=sum(r["n_generated"] for r in results),
            )  # fmt: skip
            if "masked_prefill_s" in row:
                row["prefill_vs_masked"] = row["masked_prefill_s"] / prefill_s
            if args.prefill_batch == 1:
                # What fits on this GPU: the weights, one context's pass (its whole cache and
                # activations: the peak less the compacted caches) and B compacted caches.
                per_document = kv_bytes / batch / 2**30
                one_pass = peak - report["weights_GiB"] - kv_bytes / 2**30
                row["largest_batch_estimate"] = int((gpu_GiB - report["weights_GiB"] - one_pass) // per_document)
            if method == "baseline":
                baseline = row
            if baseline is not None:
                context_share = tokens / (tokens + args.question + args.new_tokens)
                row.update(
                    kv_memory_vs_baseline=row["kv_GiB"] / baseline["kv_GiB"],
                    kv_memory_bound=1.15 * density * context_share + (1 - context_share),
                    decode_vs_baseline=row["decode_tok_s"] / baseline["decode_tok_s"],
                    prefill_vs_baseline=baseline["prefill_s"] / row["prefill_s"],
                )
            report["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)
    report["wall_s"] = time.perf_counter() - began
    save()


if __name__ == "__main__":
    main()
