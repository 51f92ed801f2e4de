"""GPU throughput of kvsweep's streaming evaluation, side by side with the uncompressed baseline.

    python benchmarks/gpu_throughput.py --arch qwen3-8b --output results.json [--budget-s 540]

Models of real architectures (configs in benchmarks/configs/) with random bf16 weights; speed does
not depend on the weights' values. For each workload and batch size it times `baseline`, `kvzap`
and `h2o` in the same process, one after the other, and reports tokens/s, peak GPU memory, the
ratio to baseline and the ratio to the hardware floor, with the floor's two rates (device copy
bandwidth, bf16 matmul) measured in the same run. Where the upstream path runs (kvpress `DMSPress`
with its fake-key masking), it is timed in the same run as an anchor. Results are written after
every measurement, so a run cut short keeps what it measured.
"""

import argparse
import datetime
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from kvpress import DMSPress, KVzapPress
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from kvsweep.generate import stream_generate
from kvsweep.presses import H2OScorer, KVzapSurrogatePress, StreamingThresholdPress
from kvsweep.stream_nll import stream_nll

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
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params - model.get_input_embeddings().weight.numel()
    kv_bytes_per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 2
    seconds = 0.0
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        tokens = batch * (end - start)
        bytes_moved = params * 2 + batch * end * kv_bytes_per_token
        attention_flops = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (start + end) / 2
        flops = tokens * (2 * matmul_params + attention_flops)
        seconds += max(bytes_moved / (floors["copy_TBps"] * 1e12), flops / (floors["bf16_matmul_TFLOPs"] * 1e12))
    return batch * n_tokens / seconds


def kvsweep_press(method, surrogate, threshold):
    if method == "baseline":
        return None
    if method == "h2o":
        return StreamingThresholdPress(H2OScorer(), threshold=threshold, sliding_window_size=512)
    scorer = KVzapSurrogatePress(model_type="mlp", surrogate="random-surrogate")
    scorer.kvzap_model, scorer.kvzap_model_name = surrogate, "random-surrogate"
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=128)


def upstream_kvzap_press(model, surrogate, threshold):
    """kvpress's own DMSPress(KVzapPress), with the random surrogate under the name it expects."""
    scorer = KVzapPress(model_type="mlp")
    scorer.kvzap_model = surrogate
    scorer.kvzap_model_name = f"nvidia/KVzap-mlp-{str(model.config.name_or_path).split('/')[-1]}"
    return DMSPress(scorer, threshold=threshold, sliding_window_size=128, decoding=True)


def upstream_stream(model, ids, chunk, press):
    """The old loop on upstream kvpress: DMSPress(decoding=True) with fake-key masking."""
    cache = DynamicCache(config=model.config)
    total = torch.zeros((), device="cuda", dtype=torch.float64)
    with torch.inference_mode(), press(model) if press is not None else nullcontext():
        for s in range(0, ids.shape[1], chunk):
            e = min(s + chunk, ids.shape[1])
            pos = torch.arange(s, e, device="cuda")
            logits = model(input_ids=ids[:, s:e], position_ids=pos.expand(ids.shape[0], -1), cache_position=pos,
                           past_key_values=cache, use_cache=True).logits  # fmt: skip
            if e < ids.shape[1]:
                target = ids[:, s + 1 : e + 1]
                total += F.cross_entropy(
                    logits[:, : target.shape[1]].float().flatten(0, 1), target.flatten(), reduction="sum"
                )
    return float(total)


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
    parser.add_argument("--output", required=True)
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting new measurements after this")
    parser.add_argument("--workloads", default="chunk128,chunk1,upstream")
    args = parser.parse_args()
    began = time.time()

    report = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "arch": args.arch,
        "floors": measure_floors(),
        "runs": [],
    }
    model, surrogate = build_model(args.arch)
    report["params_B"] = sum(p.numel() for p in model.parameters()) / 1e9
    vocab = model.config.vocab_size
    thresholds = {"kvzap": 0.0, "h2o": 2e-4}
    # Random surrogate: threshold at the median of its scores on random tokens (about half evicted).
    with torch.inference_mode():
        probe = model.get_input_embeddings()(torch.randint(0, vocab, (1, 512), device="cuda"))
        thresholds["kvzap"] = float(surrogate.layers[0](probe).float().median())
    report["thresholds"] = thresholds
    print(json.dumps({k: report[k] for k in ("card", "floors", "params_B", "thresholds")}), flush=True)

    def save():
        Path(args.output).write_text(json.dumps(report, indent=1))

    # Correctness on this card first: with threshold -inf every method must reproduce the baseline.
    docs = torch.randint(0, vocab, (2, 1024), generator=torch.Generator().manual_seed(1)).tolist()
    reference = stream_nll(model, docs, 128)
    report["checks"] = {}
    for method in ("kvzap", "h2o"):
        results = stream_nll(model, docs, 128, kvsweep_press(method, surrogate, float("-inf")))
        worst = max(abs(r["nll_sum"] - b["nll_sum"]) / b["nll_sum"] for r, b in zip(results, reference, strict=True))
        report["checks"][f"{method}_minus_inf_vs_baseline_max_rel_nll_diff_bf16"] = worst
    print(json.dumps(report["checks"]), flush=True)

    plans = []
    for workload in args.workloads.split(","):
        if workload == "chunk128":
            plans += [("chunk128", 8192, 128, batch) for batch in (1, 8, 16)]
        elif workload == "chunk1":
            plans += [("chunk1", 1024, 1, batch) for batch in (1, 8, 16)]
    generator = torch.Generator().manual_seed(0)

    def time_methods(fields: dict, work, warm_up, tokens: int, extra=lambda results, rate: {}):
        """Time baseline, kvzap and h2o one after the other on the same work; record each run."""
        baseline_rate = None
        for method in ("baseline", "kvzap", "h2o"):
            if time.time() - began > args.budget_s:
                report.setdefault("skipped", []).append(f"{fields['workload']} b{fields['batch']} {method}")
                continue
            press = kvsweep_press(method, surrogate, thresholds.get(method))
            warm_up(press)
            results, seconds, peak = timed(lambda: work(press))  # noqa: B023
            rate = tokens / seconds
            baseline_rate = rate if method == "baseline" else baseline_rate
            run = {
                **fields, "method": method, "tok_per_s": rate, "seconds": seconds, "peak_GiB": peak,
                "vs_baseline": rate / baseline_rate if baseline_rate else None,
                **extra(results, rate),
                "kv_density": sum(r["kv_kept"] for r in results) / sum(r["kv_total"] for r in results),
            }  # fmt: skip
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
            save()

    for name, n_tokens, chunk, batch in plans:
        docs = torch.randint(0, vocab, (batch, n_tokens), generator=generator).tolist()
        floor = floor_tokens_per_s(model, report["floors"], batch, n_tokens, chunk)
        time_methods(
            {"workload": name, "tokens": n_tokens, "chunk": chunk, "batch": batch},
            work=lambda press: stream_nll(model, docs, chunk, press),  # noqa: B023
            warm_up=lambda press: stream_nll(model, [d[: 2 * chunk + 3] for d in docs], chunk, press),  # noqa: B023
            tokens=batch * n_tokens,
            extra=lambda results, rate: {  # noqa: B023
                "floor_tok_per_s": floor,  # noqa: B023
                "fraction_of_floor": rate / floor,  # noqa: B023
                "nll_per_token": sum(r["nll_sum"] for r in results) / sum(r["n_predicted"] for r in results),
            },
        )

    if "generate" in args.workloads:
        # Summarization-style: an 8,192-token context streamed in chunks of 128, then 256 greedy tokens.
        context, new = 8192, 256
        for batch in (1, 8):
            prompts = torch.randint(0, vocab, (batch, context), generator=generator).tolist()
            time_methods(
                {"workload": "generate", "tokens": context, "new_tokens": new, "chunk": 128, "batch": batch},
                work=lambda press: stream_generate(model, prompts, 128, new, press),  # noqa: B023
                warm_up=lambda press: stream_generate(model, [p[:300] for p in prompts], 128, 4, press),  # noqa: B023
                tokens=batch * new,
            )
        if time.time() - began < args.budget_s:
            # Anchor: kvpress's own generation pipeline with DMSPress + KVzap, batch 1 (brief: 9 tok/s).
            from kvpress.pipeline import KVPressTextGenerationPipeline
            from tokenizers import Tokenizer, models
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
            )
            pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
            model.generation_config.eos_token_id = None
            upstream = upstream_kvzap_press(model, surrogate, thresholds["kvzap"])
            ctx = torch.randint(0, vocab, (1, context), generator=generator).cuda()
            question = torch.randint(0, vocab, (1, 16), generator=generator).cuda()
            entry = {
                "workload": "upstream_kvpress_pipeline_dms_kvzap_generate",
                "tokens": context,
                "new_tokens": new,
                "batch": 1,
            }
            try:
                _, seconds, peak = timed(
                    lambda: pipe._forward(
                        {"context_ids": ctx, "questions_ids": [question]}, max_new_tokens=new, press=upstream
                    )
                )
                entry.update(tok_per_s=new / seconds, seconds=seconds, peak_GiB=peak)
            except Exception as err:  # noqa: BLE001 (recording how upstream fails is the point)
                entry["error"] = repr(err)[:300]
            report["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            save()

    if "upstream" in args.workloads:
        for n_tokens, chunk in ((256, 1), (8192, 128)):
            if time.time() - began > args.budget_s:
                break
            ids = torch.randint(0, vocab, (1, n_tokens), generator=generator).cuda()
            press = upstream_kvzap_press(model, surrogate, thresholds["kvzap"])
            entry = {
                "workload": f"upstream_kvpress_dms_kvzap_chunk{chunk}",
                "tokens": n_tokens,
                "chunk": chunk,
                "batch": 1,
            }
            try:
                upstream_stream(model, ids[:, : 2 * chunk + 3], chunk, press)
                _, seconds, peak = timed(lambda: upstream_stream(model, ids, chunk, press))  # noqa: B023
                entry.update(tok_per_s=n_tokens / seconds, peak_GiB=peak)
            except Exception as err:  # noqa: BLE001 (recording how upstream fails is the point)
                entry["error"] = repr(err)[:300]
            report["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            save()
    report["wall_s"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
