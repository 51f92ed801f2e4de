"""GPU throughput of kvsweep's streaming evaluation, side by side with the uncompressed baseline.

    python benchmarks/gpu_throughput.py --arch qwen3-8b --output results.json [--budget-s 540]

Models of real architectures (configs in benchmarks/configs/) with random bf16 weights; speed does
not depend on the weights' values. For each workload and batch size it times `baseline`, `kvzap`
and `h2o` in the same process, one after the other, and reports tokens/s, peak GPU memory, the
ratio to baseline and the ratio to the hardware floor, with the floor's two rates (device copy
bandwidth, bf16 matmul) measured in the same run. Each kvsweep row is timed --repeats times (3)
after one warm-up of the same length, in the same process: the median is reported, with every
timing and the spread. The calls of a row share their passes and CUDA graphs (`ReusablePasses`), as a
workflow job's batches do, so the timings hold no graph captures (`--fresh-passes`: each call
builds and captures its own, as a lone `stream_nll` call does). Generation is reported against the
floor of its whole work (the prompt's chunks, then one pass per new token), and its decoding steps
alone (the call minus a prefill-only call) against theirs. Where the upstream path runs (kvpress
`DMSPress` with its fake-key masking), it is timed in the same run as an anchor. Results are
written after every measurement, so a run cut short keeps what it measured.
"""

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from transformers import AutoConfig, AutoModelForCausalLM

from kvsweep.engine.generate import stream_generate
from kvsweep.engine.passes import ReusablePasses
from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.scorers import H2OScorer, KVzapScorer
from kvsweep.engine.stream_nll import stream_nll

from anchors import kvpress_pipeline, upstream_kvzap_press, upstream_stream
from checks import correctness_checks

CONFIGS = Path(__file__).parent / "configs"


def measure_floors() -> dict:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    copy_bps = 2 * x.numel() * 10 / (time.perf_counter() - start)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    matmul_flops = 2 * 8192**3 * 20 / (time.perf_counter() - start)
    return {"copy_TBps": copy_bps / 1e12, "bf16_matmul_TFLOPs": matmul_flops / 1e12}


def build_model(arch: str):
    spec = json.loads((CONFIGS / f"{arch}.json").read_text())
    config = AutoConfig.for_model(**spec)
    # The same random weights in every run (and kvzap's threshold, from seeded tokens), so that NLLs
    # and KV densities compare across runs: a change that rounds nothing must leave them as they were.
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    torch.set_default_dtype(torch.float32)
    text = model.config
    surrogate = KVzapModel(
        KVzapConfig(
            input_dim=text.hidden_size,
            output_dim=text.num_key_value_heads,
            n_modules=text.num_hidden_layers,
            hidden_dim=512,
        )
    ).to("cuda", torch.bfloat16)
    return model, surrogate


def floor_tokens_per_s(model, floors, batch, n_tokens, chunk) -> float:
    """Fewest seconds the work can take: per pass, the larger of (weights + KV read) / bandwidth and
    FLOPs / matmul rate; the KV cache and attention FLOPs grow with the position."""
    seconds = sum(
        floor_pass_seconds(model, floors, batch, start, min(start + chunk, n_tokens))
        for start in range(0, n_tokens, chunk)
    )
    return batch * n_tokens / seconds


def floor_pass_seconds(model, floors, batch, start, end) -> float:
    """The floor of one pass of `batch` documents over positions [start, end) (causal attention).
    A pass reads every weight but the input embedding table, of which it looks up a row per token
    (the whole table when the output head shares it), and the KV cache up to `end`."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    matmul_params = params - embedding.numel()
    kv_bytes_per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 2
    tokens = batch * (end - start)
    weights_read = params if tied else params - embedding.numel() + tokens * embedding.shape[1]
    bytes_moved = weights_read * 2 + batch * end * kv_bytes_per_token
    attention_flops = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (start + end) / 2
    flops = tokens * (2 * matmul_params + attention_flops)
    return max(bytes_moved / (floors["copy_TBps"] * 1e12), flops / (floors["bf16_matmul_TFLOPs"] * 1e12))


def generation_floor_seconds(model, floors, batch, context, new, chunk=128) -> tuple[float, float]:
    """The floors of generation's two parts: the prompt in chunks, then one pass per new token
    (the first comes from the prompt's last logits)."""
    prefill = batch * context / floor_tokens_per_s(model, floors, batch, context, chunk)
    decode = sum(
        floor_pass_seconds(model, floors, batch, context + step, context + step + 1) for step in range(new - 1)
    )
    return prefill, decode


def refloor(path: str) -> None:
    """Recompute the floors of a report written by an earlier version of this script (whose floor
    counted the input embedding table as read on every pass) from its measured rates, in place.
    Needs no GPU: the model is built on the meta device."""
    report = json.loads(Path(path).read_text())
    spec = json.loads((CONFIGS / f"{report['arch']}.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec))
    floors = report["floors"]
    for run in report["runs"]:
        if "fraction_of_floor" not in run:
            continue
        if run["workload"] == "generate":
            batch, context, new = run["batch"], run["tokens"], run["new_tokens"]
            prefill, decode = generation_floor_seconds(model, floors, batch, context, new, run["chunk"])
            run["floor_tok_per_s"] = batch * new / (prefill + decode)
            if "decode_step_ms" in run:
                steps = run["decode_step_ms"] / 1e3 * (new - 1)
                run["decode_floor_tok_per_s"] = batch * (new - 1) / decode
                run["decode_fraction_of_floor"] = decode / steps
        else:
            run["floor_tok_per_s"] = floor_tokens_per_s(model, floors, run["batch"], run["tokens"], run["chunk"])
        run["fraction_of_floor"] = run["tok_per_s"] / run["floor_tok_per_s"]
    report["floor_formula"] = FLOOR_FORMULA
    Path(path).write_text(json.dumps(report, indent=1))


FLOOR_FORMULA = "weights read per pass exclude the input embedding table (rows looked up), unless tied to the head"


def kvsweep_press(method, surrogate, threshold, window=None):
    """The study's settings: KVzap with a 128-token window, H2O with a 512-token one."""
    if method == "baseline":
        return None
    if method == "h2o":
        return StreamingThresholdPress(H2OScorer(), threshold=threshold, sliding_window_size=window or 512)
    scorer = KVzapScorer(model_type="mlp", surrogate="random-surrogate")
    scorer.kvzap_model, scorer.kvzap_model_name = surrogate, "random-surrogate"
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=window or 128)


def new_report(arch: str) -> dict:
    """What every throughput report starts with: the card, the date, torch, the architecture and
    the floors measured now."""
    return {
        "card": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "arch": arch,
        "floors": measure_floors(),
        "floor_formula": FLOOR_FORMULA,
        "runs": [],
    }


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return value, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen3-8b", choices=[p.stem for p in CONFIGS.glob("*.json")])
    parser.add_argument("--output", required=True, help="the report (with --refloor: the report to update)")
    parser.add_argument("--refloor", action="store_true", help="recompute the floors of an existing report (no GPU)")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting new measurements after this")
    parser.add_argument("--workloads", default="chunk1,chunk128,generate")
    parser.add_argument("--batches", default="1,8,16", help="batch sizes (generation: 1 and 8 of them)")
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness checks on the card")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each kvsweep row, in this process (median)")
    parser.add_argument(
        "--fresh-passes", action="store_true", help="each call captures its own graphs (no ReusablePasses)"
    )
    args = parser.parse_args()
    if args.refloor:
        refloor(args.output)
        return
    began = time.time()
    batches = [int(b) for b in args.batches.split(",")]

    report = new_report(args.arch)
    model, surrogate = build_model(args.arch)
    report["params_B"] = sum(p.numel() for p in model.parameters()) / 1e9
    vocab = model.config.vocab_size
    thresholds = {"kvzap": 0.0, "h2o": 2e-4}
    # Random surrogate: threshold at the median of its scores on random tokens (about half evicted).
    with torch.inference_mode():
        probe = model.get_input_embeddings()(torch.randint(0, vocab, (1, 512), device="cuda"))
        thresholds["kvzap"] = float(surrogate.layers[0](probe).float().median())
    report["thresholds"] = thresholds
    report["passes"] = "fresh per call" if args.fresh_passes else "kept across the calls of a row (ReusablePasses)"
    print(json.dumps({k: report[k] for k in ("card", "floors", "params_B", "thresholds")}), flush=True)

    def save():
        Path(args.output).write_text(json.dumps(report, indent=1))

    if not args.skip_checks:
        report["checks"] = correctness_checks(model, surrogate, thresholds, kvsweep_press)
        print(json.dumps(report["checks"]), flush=True)
        save()

    generator = torch.Generator().manual_seed(0)

    def record(run: dict):
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        save()

    def time_methods(fields: dict, work, tokens: int, extra=lambda results, rate, press: {}, anchors=()):
        """Time baseline, kvzap and h2o one after the other on the same work, then the anchors
        (name, work, tokens) of the same workload; record each run."""
        baseline_rate = None
        for method in ("baseline", "kvzap", "h2o", *(name for name, _, _ in anchors)):
            if time.time() - began > args.budget_s:
                report.setdefault("skipped", []).append(f"{fields['workload']} b{fields['batch']} {method}")
                continue
            anchor = next((a for a in anchors if a[0] == method), None)
            if anchor is not None:
                try:
                    _, seconds, peak = timed(anchor[1])
                except Exception as err:  # noqa: BLE001 (recording how upstream fails is the point)
                    record({**fields, "method": method, "error": repr(err)[:300]})
                    torch.cuda.empty_cache()
                    continue
                rate = anchor[2] / seconds
                vs_baseline = rate / baseline_rate if baseline_rate else None
                record({**fields, "method": method, "tok_per_s": rate, "seconds": seconds, "peak_GiB": peak,
                        "tokens_timed": anchor[2] // fields["batch"], "vs_baseline": vs_baseline})  # fmt: skip
                continue
            press = kvsweep_press(method, surrogate, thresholds.get(method))
            kept = None if args.fresh_passes else ReusablePasses()
            # The warm-up is the work itself: it captures every shape the timed calls replay.
            work(press, kept)
            # Each row timed `repeats` times in this process: the median is what is reported, and
            # the spread ((max - min) / median) says how far one timing can be trusted.
            timings = [timed(lambda: work(press, kept)) for _ in range(args.repeats)]  # noqa: B023
            rates = sorted(tokens / seconds for _, seconds, _ in timings)
            rate = statistics.median(rates)
            results, peak = timings[0][0], max(t[2] for t in timings)
            baseline_rate = rate if method == "baseline" else baseline_rate
            record({
                **fields, "method": method, "tok_per_s": rate, "seconds": tokens / rate, "peak_GiB": peak,
                "repeats": len(rates), "tok_per_s_each": [tokens / t[1] for t in timings],
                "spread": (rates[-1] - rates[0]) / rate,
                "vs_baseline": rate / baseline_rate if baseline_rate else None,
                **extra(results, rate, press),
                "kv_density": sum(r["kv_kept"] for r in results) / sum(r["kv_total"] for r in results),
            })  # fmt: skip

    def time_generation(batch: int):
        """Summarization-style: an 8,192-token context streamed in chunks of 128, then 256 greedy tokens."""
        context, new = 8192, 256
        model.generation_config.eos_token_id = None
        prompts = torch.randint(0, vocab, (batch, context), generator=generator).tolist()
        ids = torch.tensor(prompts, device="cuda")
        anchors = [("transformers_generate_no_press", lambda: model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0), batch * new)]  # fmt: skip
        if batch == 1:
            anchors += [
                ("kvpress_pipeline_no_press", kvpress_pipeline(model, surrogate, None, ids, new), new),
                ("kvpress_pipeline_dms_kvzap", kvpress_pipeline(model, surrogate, thresholds["kvzap"], ids, new), new),
            ]
        prefill_floor, decode_floor = generation_floor_seconds(model, report["floors"], batch, context, new)

        def decoding_alone(results, rate, press):
            """The decoding steps alone: the whole call minus a call that stops after the prompt
            (its own kept passes, warmed up, then timed as often as the row)."""
            kept = None if args.fresh_passes else ReusablePasses()
            stream_generate(model, prompts, 128, 1, press, reuse=kept)
            prefill = statistics.median(
                timed(lambda: stream_generate(model, prompts, 128, 1, press, reuse=kept))[1]
                for _ in range(args.repeats)
            )
            steps = batch * new / rate - prefill
            return {
                "floor_tok_per_s": batch * new / (prefill_floor + decode_floor),
                "fraction_of_floor": rate * (prefill_floor + decode_floor) / (batch * new),
                "prefill_s": prefill,
                "decode_step_ms": steps / (new - 1) * 1e3,
                "decode_tok_per_s": batch * (new - 1) / steps,
                "decode_floor_tok_per_s": batch * (new - 1) / decode_floor,
                "decode_fraction_of_floor": decode_floor / steps,
            }

        time_methods(
            {"workload": "generate", "tokens": context, "new_tokens": new, "chunk": 128, "batch": batch},
            work=lambda press, kept: stream_generate(model, prompts, 128, new, press, reuse=kept),
            tokens=batch * new,
            extra=decoding_alone,
            anchors=anchors,
        )

    # Workloads in the order given; generation at batch sizes 1 and 8 only.
    plans = []
    for workload in args.workloads.split(","):
        if workload == "generate":
            plans += [("generate", 8192, 128, batch) for batch in batches if batch in (1, 8)]
        else:
            n_tokens, chunk = {"chunk128": (8192, 128), "chunk1": (1024, 1)}[workload]
            plans += [(workload, n_tokens, chunk, batch) for batch in batches]
    for name, n_tokens, chunk, batch in plans:
        if name == "generate":
            time_generation(batch)
            continue
        docs = torch.randint(0, vocab, (batch, n_tokens), generator=generator).tolist()
        ids = torch.tensor(docs, device="cuda")
        floor = floor_tokens_per_s(model, report["floors"], batch, n_tokens, chunk)
        # The old loop (eager transformers, DynamicCache, no press); at chunk 1 over the first 256
        # tokens only (its steps cost the same at any position: weights dominate the bytes moved).
        eager_tokens = n_tokens if chunk > 1 else 256
        anchors = [("transformers_eager_no_press", lambda: upstream_stream(model, ids[:, :eager_tokens], chunk, None),  # noqa: B023
                    batch * eager_tokens)]  # fmt: skip
        if batch == 1:  # kvpress's own DMSPress(KVzap): fake keys, fails beyond a few queries per pass
            anchors.append(("kvpress_dms_kvzap", lambda: upstream_stream(model, ids[:, :eager_tokens], chunk,  # noqa: B023
                            upstream_kvzap_press(model, surrogate, thresholds["kvzap"])), batch * eager_tokens))  # fmt: skip
        time_methods(
            {"workload": name, "tokens": n_tokens, "chunk": chunk, "batch": batch},
            work=lambda press, kept: stream_nll(model, docs, chunk, press, reuse=kept),  # noqa: B023
            tokens=batch * n_tokens,
            extra=lambda results, rate, press: {  # noqa: B023
                "floor_tok_per_s": floor,  # noqa: B023
                "fraction_of_floor": rate / floor,  # noqa: B023
                "nll_per_token": sum(r["nll_sum"] for r in results) / sum(r["n_predicted"] for r in results),
            },
            anchors=anchors,
        )

    report["wall_s"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
