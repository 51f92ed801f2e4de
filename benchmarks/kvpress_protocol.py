"""kvpress's protocol on the GPU: kvsweep's `compress_once_generate` beside kvpress's own pipeline
on the same inputs (the context prefilled whole and compressed once by DMSPress(KVzapPress), the
question uncompressed, greedy decoding).

    python benchmarks/kvpress_protocol.py --arch llama-3.1-8b --output kvpress_protocol.json

Random bf16 weights (`gpu_throughput.build_model`), random token contexts, the surrogate's
threshold at the median of its scores (about half the context evicted). Per (decoding, batch):
tokens/s of the whole call (prefill, question, answer) for kvpress's pipeline (batch 1 only: it
takes one context) and for kvsweep, each after a warm-up call, and the entries each evicted per
layer (bf16 scores from different kernels may differ in their last bit, so counts may differ by
a few entries; the CPU tests hold them equal in float32).

With `--ratios`: kvpress's fixed budgets at batch 1, no decoding compression: `KnormPress`,
`AdaKVPress(KnormPress)`, `SnapKVPress`, `ExpectedAttentionPress` and `StreamingLLMPress` at
`compression_ratio` 0.5 beside kvsweep's `knorm` (per head, and adaptive with safeguard 0.2),
`snapkv`, `expected_attention` and `streaming_llm` at the same ratio (no window; 4 sinks where
kvpress's press keeps them), each side's entries kept per layer (kvpress: its cache's length after
the run; kvsweep: its counts), and how many of the greedy tokens the two share from the start.
`KVzipPress` (KVzip+, one budget over the layers) beside kvsweep's `kvzip`: KVzipPress loads the
model's tokenizer for its repeat prompt, and random weights have none, so the bundled demo
model's tokenizer stands in (its ids lie within the vocabulary; the prompt's text is the same).
"""

import argparse
import json
from pathlib import Path

import torch

from kvsweep.engine.compress_once import compress_once_generate, kvpress_evicted_per_layer

from anchors import kvpress_pipeline, kvpress_text_pipeline
from gpu_throughput import build_model, kvsweep_press, new_report, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--output", required=True)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--question", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--ratios", action="store_true", help="also kvpress's fixed budgets (scorer presses at 0.5)")
    parser.add_argument("--ratios-only", action="store_true", help="only kvpress's fixed budgets")
    parser.add_argument("--ratio-rows", default=None, help="with --ratios: only these rows (e.g. kvzip,knorm)")
    args = parser.parse_args()

    report = new_report(args.arch)
    report.update(context=args.context, question=args.question, new_tokens=args.new_tokens)
    model, surrogate = build_model(args.arch)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        probe = model.get_input_embeddings()(torch.randint(0, vocab, (1, 512), device="cuda"))
        threshold = float(surrogate.layers[0](probe).float().median())
    report["threshold"] = threshold
    generator = torch.Generator().manual_seed(0)

    def save():
        Path(args.output).write_text(json.dumps(report, indent=1))

    for decoding in () if args.ratios_only else (False, True):
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(0, vocab, (batch, args.context + args.question), generator=generator)
            contexts = [row[: args.context].tolist() for row in ids]
            questions = [row[args.context :].tolist() for row in ids]
            fields = {"decoding": decoding, "batch": batch}
            tokens = batch * (args.context + args.question + args.new_tokens)
            for method in ("baseline", "kvzap"):
                press = kvsweep_press(method, surrogate, threshold)  # kvzap: no sinks, as kvpress's DMSPress

                def ours(press=press, contexts=contexts, questions=questions, decoding=decoding):
                    return compress_once_generate(model, contexts, questions, args.new_tokens, press, decoding=decoding)

                ours()  # warm-up: kernels compiled, graphs captured
                results, seconds, peak = timed(ours)
                report["runs"].append({**fields, "method": method, "engine": "kvsweep", "seconds": seconds,
                                       "tok_per_s": tokens / seconds, "peak_GiB": peak,
                                       "evicted_per_layer": results[0]["evicted_per_layer"]})  # fmt: skip
                print(json.dumps(report["runs"][-1]), flush=True)
                save()
                if batch != 1:
                    continue
                upstream_threshold = None if method == "baseline" else threshold
                run = kvpress_pipeline(model, surrogate, upstream_threshold, ids[:, : args.context].cuda(),
                                       args.new_tokens, ids[:, args.context :].cuda(), decoding)  # fmt: skip
                try:
                    run()
                    kvpress_evicted_per_layer(model)
                    _, seconds, peak = timed(run)
                    row = {"seconds": seconds, "tok_per_s": tokens / seconds, "peak_GiB": peak,
                           "evicted_per_layer": kvpress_evicted_per_layer(model)}  # fmt: skip
                except Exception as err:  # noqa: BLE001 (how upstream fails is the finding)
                    row = {"error": repr(err)[:300]}
                    kvpress_evicted_per_layer(model)
                report["runs"].append({**fields, "method": method, "engine": "kvpress_pipeline", **row})
                print(json.dumps(report["runs"][-1]), flush=True)
                save()
    if args.ratios or args.ratios_only:
        report["ratio_runs"] = ratio_runs(model, vocab, args, generator, save, report)
    by_key = {(r["decoding"], r["batch"], r["method"], r["engine"]): r for r in report["runs"] if "decoding" in r}
    report["kvsweep_vs_kvpress"] = {
        f"{'decoding' if d else 'prefill_only'}_{m}": by_key[(d, 1, m, "kvsweep")]["tok_per_s"]
        / by_key[(d, 1, m, "kvpress_pipeline")]["tok_per_s"]
        for d in (False, True)
        for m in ("baseline", "kvzap")
        if "tok_per_s" in by_key.get((d, 1, m, "kvpress_pipeline"), {})
    }
    save()
    print(json.dumps(report["kvsweep_vs_kvpress"]))


def ratio_runs(model, vocab, args, generator, save, report, ratio=0.5):
    """kvpress's ScorerPress budgets beside kvsweep's fixed ratio, batch 1, one context."""
    from kvpress import AdaKVPress, ExpectedAttentionPress, KnormPress, KVzipPress, SnapKVPress, StreamingLLMPress
    from transformers import DynamicCache

    from kvsweep.demo import BUNDLED_MODEL
    from kvsweep.engine.methods import build_press
    from kvsweep.study.methods import get_method

    model.config.name_or_path = str(BUNDLED_MODEL)  # KVzipPress's tokenizer (see the module's docstring)

    ids = torch.randint(0, vocab, (1, args.context + args.question), generator=generator)
    context, question = ids[:, : args.context].cuda(), ids[:, args.context :].cuda()
    tokens = args.context + args.question + args.new_tokens
    rows = []
    for name, settings, safeguard, upstream in (
        ("knorm", {"sliding_window": 0, "sinks": 0}, None, KnormPress(compression_ratio=ratio)),
        ("knorm", {"sliding_window": 0, "sinks": 0}, 0.2, AdaKVPress(KnormPress(compression_ratio=ratio))),
        ("snapkv", {"window_size": 64, "kernel_size": 5}, None, SnapKVPress(compression_ratio=ratio, window_size=64)),
        (
            "expected_attention",
            {"sliding_window": 0, "sinks": 4},
            None,
            ExpectedAttentionPress(compression_ratio=ratio),
        ),
        ("streaming_llm", {"sinks": 4}, None, StreamingLLMPress(compression_ratio=ratio)),
        ("kvzip", {}, None, KVzipPress(compression_ratio=ratio, kvzip_plus_normalization=True)),
    ):
        if args.ratio_rows and name not in args.ratio_rows.split(","):
            continue
        method = get_method(name)
        resolved = method.resolve(0.0 if method.takes_threshold else None, settings)
        press = build_press(method, None, resolved, ratio, adaptive_safeguard=safeguard)
        press.post_init_from_model(model)

        def ours(press=press):
            return compress_once_generate(model, [context[0].tolist()], [question[0].tolist()], args.new_tokens, press)

        ours()
        results, seconds, peak = timed(ours)
        row = {"method": name, "ratio": ratio, "adaptive_safeguard": safeguard, "kvsweep_tok_per_s": tokens / seconds, "kvsweep_peak_GiB": peak,
               "kvsweep_evicted_per_layer": results[0]["evicted_per_layer"]}  # fmt: skip
        run = kvpress_run(model, context, question, args.new_tokens, upstream)
        run(DynamicCache())
        kvpress_evicted_per_layer(model)
        cache = DynamicCache()
        answer, seconds, peak = timed(lambda cache=cache, run=run: run(cache))
        # AdaKV masks (kvpress's masked indices); a ScorerPress shrinks the cache.
        masked = kvpress_evicted_per_layer(model)
        shrunk = [
            (args.context - cache.get_seq_length(i)) * model.config.num_key_value_heads for i in range(len(cache))
        ]
        row.update(kvpress_tok_per_s=tokens / seconds, kvpress_peak_GiB=peak,
                   kvpress_evicted_per_layer=masked if any(masked) else shrunk)  # fmt: skip
        ours_ids, theirs = results[0]["generated_ids"], answer
        row["shared_leading_tokens"] = next(
            (k for k, (a, b) in enumerate(zip(ours_ids, theirs, strict=False)) if a != b),
            min(len(ours_ids), len(theirs)),
        )
        row["kvsweep_vs_kvpress"] = row["kvsweep_tok_per_s"] / row["kvpress_tok_per_s"]
        rows.append(row)
        report["ratio_runs"] = rows
        print(json.dumps(row), flush=True)
        save()
    return rows


def kvpress_run(model, context, question, new_tokens, press):
    """kvpress's pipeline's `_forward` on one context and question with `press`, into a given
    cache (which it leaves holding the compressed context); returns the greedy token ids."""
    pipe = kvpress_text_pipeline(model)
    answers = []
    # The generated ids, read where the pipeline decodes them to text.
    pipe.tokenizer.decode = lambda ids, **_: answers.append([int(t) for t in ids]) or ""

    def run(cache):
        answers.clear()
        with torch.inference_mode():
            pipe._forward({"context_ids": context, "questions_ids": [question]}, max_new_tokens=new_tokens,
                          press=press, cache=cache)  # fmt: skip
        return answers[0]

    return run


if __name__ == "__main__":
    main()
