"""A model split over several GPUs (`gpus_per_job` > 1): the same results as on one GPU, and its speed.

    python benchmarks/multi_gpu.py --output multi_gpu.json [--steps check,qwen3-32b,llama-3.1-70b,speed8b]

Random bf16 weights of real architectures (configs/), placed as the workflow places a checkpoint
(`kvsweep.engine.placement`), with accelerate's hooks as `from_pretrained(device_map=...)` attaches them.
Each weight comes from its own seeded generator, so the one-GPU and the split model are the same.
Steps, in the order given (each is skipped once --budget-s has passed):

- `check`: the Llama-3.1-8B shape on GPU 0, then split over GPUs 0-1. For baseline, kvzap, h2o,
  random and expected_attention: streaming at chunk 128 (four documents of 700-2,600 tokens: two
  key buckets) and at chunk 1 (256 tokens), and generation (two prompts
  of different lengths, 64 new tokens, eviction while decoding). The split model's NLL, kept
  counts and generated tokens against the one-GPU model's, with CUDA graphs (captured per GPU) and
  without.
- `qwen3-32b` (2 GPUs), `llama-3.1-70b` (4 GPUs): chunk 128, 8,192 tokens, batch 8, for baseline,
  kvzap and h2o, and the baseline with torch's SDPA as its attention (`baseline_sdpa`): tokens/s, peak memory on each GPU, share of the floor (a pipeline computes on one
  GPU at a time: the floor is one GPU's, for the whole model).
- `speed8b`: the 8B shape on one GPU and split over two, the same workload and generation (an
  8,192-token context, 256 new tokens, batch 8): what the hand-overs cost.

Results are written after every measurement.
"""

import argparse
import contextlib
import datetime
import gc
import json
import time
from pathlib import Path

import torch
from accelerate import dispatch_model
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from transformers import AutoConfig, AutoModelForCausalLM

from kvsweep.engine.generate import stream_generate
from kvsweep.engine.methods import build_press
from kvsweep.engine.placement import decoder_of, keep_outputs_where_made, module_device, placement_plan
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.study.methods import get_method

from checks import torch_attention, worst_nll_diff
from gpu_throughput import CONFIGS, floor_tokens_per_s, kvsweep_press, measure_floors

METHODS = ("baseline", "kvzap", "h2o")
# The check also runs the reference points whose state differs: random (per-document tables from
# the layout's document keys) and Expected Attention (query statistics, and RoPE's rotation).
CHECKED = (*METHODS, "random", "expected_attention")


def build_split_model(arch: str, gpus: int, seed: int = 0):
    """The architecture with random bf16 weights over GPUs 0..gpus-1, and a random KVzap surrogate
    (each layer's module beside its layer)."""
    config = AutoConfig.for_model(**json.loads((CONFIGS / f"{arch}.json").read_text()))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float32)
    plan = placement_plan(model, gpus)
    for name, index in plan.items():
        model.get_submodule(name).to_empty(device=torch.device("cuda", index))
    with torch.no_grad():
        for i, (_, param) in enumerate(model.named_parameters()):
            if param.dim() == 1:  # norms
                param.fill_(1.0)
            else:
                generator = torch.Generator(device=param.device).manual_seed(seed * 100_003 + i)
                param.normal_(0.0, config.initializer_range, generator=generator)
    decoder = decoder_of(model)
    decoder.rotary_emb = type(decoder.rotary_emb)(config=model.config, device=module_device(decoder.rotary_emb))
    if gpus > 1:
        dispatch_model(model, device_map=plan, skip_keys=model._skip_keys_device_placement)
        keep_outputs_where_made(model)
    model.eval()
    torch.manual_seed(seed)
    text = model.config
    surrogate = KVzapModel(
        KVzapConfig(input_dim=text.hidden_size, output_dim=text.num_key_value_heads,
                    n_modules=text.num_hidden_layers, hidden_dim=512)
    ).to(dtype=torch.bfloat16)  # fmt: skip
    for layer, module in zip(decoder.layers, surrogate.layers, strict=True):
        module.to(module_device(layer))
    return model, surrogate


def kvzap_threshold(model, surrogate) -> float:
    """The median score of the random surrogate on random tokens (about half evicted)."""
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(5))
        probe = model.get_input_embeddings()(ids.to(model.device))
        return float(surrogate.layers[0](probe.to(module_device(surrogate.layers[0]))).float().median())


def free_gpu_memory() -> None:
    """A dispatched model is in a reference cycle (accelerate wraps its `to` in a closure over it):
    only the garbage collector frees it, and the next model's peak memory would count it."""
    gc.collect()
    torch.cuda.empty_cache()


def timed(fn, gpus: int):
    """(result, seconds, peak GiB on each GPU)."""
    for index in range(gpus):
        torch.cuda.synchronize(index)
        torch.cuda.reset_peak_memory_stats(index)
    start = time.perf_counter()
    value = fn()
    for index in range(gpus):
        torch.cuda.synchronize(index)
    seconds = time.perf_counter() - start
    return value, seconds, [torch.cuda.max_memory_allocated(index) / 2**30 for index in range(gpus)]


def check_cases(model, surrogate, threshold: float, cuda_graphs=None) -> dict:
    """Results of every (method, workload) of the `check` step."""
    vocab = model.config.vocab_size
    # Documents of different lengths, past one key bucket at chunk 128 (2,048 slots): the passes
    # free the first bucket's graphs and capture the second's.
    docs = torch.randint(0, vocab, (4, 2600), generator=torch.Generator().manual_seed(1)).tolist()
    docs = [docs[0], docs[1][:2100], docs[2][:1000], docs[3][:700]]
    prompts = [docs[0][:700], docs[1][:530]]
    thresholds = {"baseline": None, "kvzap": threshold}
    results = {}
    for method in CHECKED:
        chunk128 = check_press(method, surrogate, thresholds.get(method, 2e-3))
        chunk1 = check_press(method, surrogate, thresholds.get(method, 1e-2), window=64)
        decoding = check_press(method, surrogate, thresholds.get(method, 2e-3), window=64)
        results[f"{method}_chunk128"] = stream_nll(model, docs, 128, chunk128, cuda_graphs=cuda_graphs)
        results[f"{method}_chunk1"] = stream_nll(model, [d[:256] for d in docs], 1, chunk1, cuda_graphs=cuda_graphs,
                                                 key_bucket=64)  # fmt: skip
        results[f"{method}_generate"] = stream_generate(model, prompts, 128, 64, decoding, cuda_graphs=cuda_graphs)
    return results


def check_press(method, surrogate, threshold, window=None):
    """The benchmark's presses, and random eviction (evicting ~40%) and Expected Attention (scores
    are attention probabilities, as H2O's: the same thresholds) with the study's windows."""
    if method not in ("random", "expected_attention"):
        return kvsweep_press(method, surrogate, threshold, window)
    spec, settings = get_method(method), {"sliding_window": window or 128, "sinks": 4}
    if method == "random":
        threshold, settings = 0.4, {**settings, "seed": 42}
    return build_press(spec, threshold, spec.resolve(threshold, settings))


def compare(split: dict, single: dict) -> dict:
    """Per case: the largest relative NLL difference, and whether kept counts (and generated tokens)
    are the same."""
    out = {}
    for case, reference in single.items():
        results = split[case]
        if case.endswith("generate"):
            out[f"{case}_same_tokens_and_kv"] = results == reference
            continue
        out[f"{case}_max_rel_nll_diff"] = worst_nll_diff(results, reference)
        out[f"{case}_same_kv_kept"] = [r["kv_kept"] for r in results] == [r["kv_kept"] for r in reference]
        out[f"{case}_kv_density"] = sum(r["kv_kept"] for r in results) / sum(r["kv_total"] for r in results)
    return out


def time_chunk128(model, surrogate, gpus: int, floors: dict, record, fields: dict, batch=8, n_tokens=8192):
    vocab = model.config.vocab_size
    docs = torch.randint(0, vocab, (batch, n_tokens), generator=torch.Generator().manual_seed(0)).tolist()
    thresholds = {"kvzap": kvzap_threshold(model, surrogate), "h2o": 2e-4}
    floor = floor_tokens_per_s(model, floors, batch, n_tokens, 128)
    baseline_rate = None
    for method in (*METHODS, "baseline_sdpa"):
        press = kvsweep_press(method.removesuffix("_sdpa"), surrogate, thresholds.get(method))
        # baseline_sdpa: the baseline's attention through torch's SDPA, as before issue 15's kernel.
        with torch_attention() if method.endswith("_sdpa") else contextlib.nullcontext():
            stream_nll(model, [d[:259] for d in docs], 128, press)  # warm-up (Triton, allocator)
            results, seconds, peaks = timed(lambda: stream_nll(model, docs, 128, press), gpus)  # noqa: B023
        rate = batch * n_tokens / seconds
        baseline_rate = baseline_rate or rate
        record({
            **fields, "method": method, "workload": "chunk128", "tokens": n_tokens, "batch": batch, "gpus": gpus,
            "tok_per_s": rate, "seconds": seconds, "peak_GiB_per_gpu": peaks, "floor_tok_per_s": floor,
            "share_of_floor": rate / floor, "vs_baseline": rate / baseline_rate,
            "kv_density": sum(r["kv_kept"] for r in results) / sum(r["kv_total"] for r in results),
        })  # fmt: skip


def time_generation(model, surrogate, gpus: int, record, fields: dict, batch=8, context=8192, new=256):
    """Summarization-style, as gpu_throughput.py: the context streamed in chunks of 128, then `new`
    greedy tokens (tokens/s over the new tokens of every document): a hand-over per decoding step."""
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0)).tolist()
    thresholds = {"kvzap": kvzap_threshold(model, surrogate), "h2o": 2e-4}
    baseline_rate = None
    for method in METHODS:
        press = kvsweep_press(method, surrogate, thresholds.get(method))
        stream_generate(model, [p[:300] for p in prompts], 128, 4, press)  # warm-up
        _, seconds, peaks = timed(lambda: stream_generate(model, prompts, 128, new, press), gpus)  # noqa: B023
        rate = batch * new / seconds
        baseline_rate = baseline_rate or rate
        record({**fields, "method": method, "workload": "generate", "tokens": context, "new_tokens": new,
                "batch": batch, "gpus": gpus, "tok_per_s": rate, "seconds": seconds, "peak_GiB_per_gpu": peaks,
                "vs_baseline": rate / baseline_rate})  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", default="check,qwen3-32b,llama-3.1-70b,speed8b")
    parser.add_argument("--budget-s", type=float, default=560, help="start no step after this")
    args = parser.parse_args()
    began = time.time()
    report = {
        "card": torch.cuda.get_device_name(),
        "gpus_visible": torch.cuda.device_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "floors": measure_floors(),
        "runs": [],
        "skipped": [],
    }

    def save():
        Path(args.output).write_text(json.dumps(report, indent=1))

    def record(run: dict):
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        save()

    print(json.dumps({k: report[k] for k in ("card", "gpus_visible", "floors")}), flush=True)
    for step in args.steps.split(","):
        if time.time() - began > args.budget_s:
            report["skipped"].append(step)
            save()
            continue
        if step == "check":
            model, surrogate = build_split_model("llama-3.1-8b", 1)
            threshold = kvzap_threshold(model, surrogate)
            single = check_cases(model, surrogate, threshold)
            del model, surrogate
            free_gpu_memory()
            model, surrogate = build_split_model("llama-3.1-8b", 2)
            checks = {"kvzap_threshold": threshold, "split_over": 2}
            checks.update(
                {f"graphs_{k}": v for k, v in compare(check_cases(model, surrogate, threshold), single).items()}
            )
            eager = check_cases(model, surrogate, threshold, cuda_graphs=False)
            checks.update({f"eager_{k}": v for k, v in compare(eager, single).items()})
            report["checks"] = checks
            print(json.dumps(checks), flush=True)
            save()
            del model, surrogate
            free_gpu_memory()
        elif step in ("qwen3-32b", "llama-3.1-70b", "speed8b"):
            arch, counts = {"qwen3-32b": ("qwen3-32b", (2,)), "llama-3.1-70b": ("llama-3.1-70b", (4,)),
                            "speed8b": ("llama-3.1-8b", (1, 2))}[step]  # fmt: skip
            for gpus in counts:
                if gpus > torch.cuda.device_count():
                    report["skipped"].append(f"{step} on {gpus} GPUs: {torch.cuda.device_count()} visible")
                    continue
                model, surrogate = build_split_model(arch, gpus)
                params = sum(p.numel() for p in model.parameters()) / 1e9
                time_chunk128(model, surrogate, gpus, report["floors"], record, {"arch": arch, "params_B": params})
                if step == "speed8b":
                    time_generation(model, surrogate, gpus, record, {"arch": arch, "params_B": params})
                del model, surrogate
                free_gpu_memory()
        else:
            raise SystemExit(f"unknown step {step}")
    report["seconds"] = time.time() - began
    save()


if __name__ == "__main__":
    main()
