"""Correctness on the card, checked before the benchmark times anything (`gpu_throughput.py`)."""

from unittest.mock import patch

import torch
from transformers.models.llama import modeling_llama

from kvsweep.engine import attention
from kvsweep.engine.generate import stream_generate
from kvsweep.engine.integration import fusions, joined
from kvsweep.engine.layout import KeyVisibility
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.kernels import attention as attention_kernels
from kvsweep.kernels import decisions, entry_scores, rms_norm, rope, silu_and_mul, surrogate_mlp


def correctness_checks(model, surrogate, thresholds, kvsweep_press) -> dict:
    """On this card: with threshold -inf every method reproduces the baseline; CUDA-graph replay
    reproduces the eager passes (same NLL, same evictions, same generated tokens); H2O's Triton
    column sums agree with float64 and with the torch path. `kvsweep_press(method, surrogate,
    threshold, window=None)` builds the benchmark's presses."""
    vocab = model.config.vocab_size
    docs = torch.randint(0, vocab, (2, 1024), generator=torch.Generator().manual_seed(1)).tolist()
    reference = stream_nll(model, docs, 128)
    checks = {}
    for method in ("kvzap", "h2o"):
        results = stream_nll(model, docs, 128, kvsweep_press(method, surrogate, float("-inf")))
        checks[f"{method}_minus_inf_vs_baseline_max_rel_nll_diff_bf16"] = worst_nll_diff(results, reference)
    # At chunk 1 over 200 tokens with 64-token windows and key buckets (4 captures). H2O's thresholds
    # here are set for these short documents (mean attention ~ 1 / length), so that both evict.
    cases = [("kvzap", 1, 200, thresholds["kvzap"]), ("h2o", 1, 200, 1e-2),
             ("kvzap", 128, 1024, thresholds["kvzap"]), ("h2o", 128, 1024, 2e-3)]  # fmt: skip
    for method, chunk, n_tokens, threshold in cases:
        short = [doc[:n_tokens] for doc in docs]
        press = kvsweep_press(method, surrogate, threshold, window=64 if chunk == 1 else None)
        bucket = 64 if chunk == 1 else None
        graphs = stream_nll(model, short, chunk, press, key_bucket=bucket)
        eager = stream_nll(model, short, chunk, press, cuda_graphs=False, key_bucket=bucket)
        name = f"{method}_chunk{chunk}_{n_tokens}tok_graphs_vs_eager"
        checks[f"{name}_max_rel_nll_diff"] = worst_nll_diff(graphs, eager)
        checks[f"{name}_same_kv_kept"] = [r["kv_kept"] for r in graphs] == [r["kv_kept"] for r in eager]
        checks[f"{name}_kv_density"] = sum(r["kv_kept"] for r in graphs) / sum(r["kv_total"] for r in graphs)
    # Generation: two prompts of different lengths, eviction while decoding, 96 new tokens.
    prompts = [docs[0][:700], docs[1][:530]]
    for method, threshold in (("kvzap", thresholds["kvzap"]), ("h2o", 2e-3)):
        press = kvsweep_press(method, surrogate, threshold, window=64)
        graphs = stream_generate(model, prompts, 128, 96, press)
        eager = stream_generate(model, prompts, 128, 96, press, cuda_graphs=False)
        checks[f"{method}_generate_graphs_vs_eager_same_tokens_and_kv"] = graphs == eager
    # Baseline and kvzap attend through the same forward kernel on a GPU: against torch's SDPA.
    for method in ("baseline", "kvzap"):
        press = kvsweep_press(method, surrogate, thresholds.get(method))
        kernel = stream_nll(model, [doc[:1024] for doc in docs], 128, press)
        with torch_attention():
            sdpa = stream_nll(model, [doc[:1024] for doc in docs], 128, press)
        name = f"{method}_chunk128_1024tok_kernel_vs_sdpa"
        checks[f"{name}_max_rel_nll_diff"] = worst_nll_diff(kernel, sdpa)
        checks[f"{name}_kv_kept"] = [[r["kv_kept"] for r in kernel], [r["kv_kept"] for r in sdpa]]
    # Exact streaming (one query per pass: the kernels with split keys past 512 slots) against the
    # torch path.
    for method, threshold in (("kvzap", thresholds["kvzap"]), ("h2o", 2e-3)):
        press = kvsweep_press(method, surrogate, threshold, window=64)
        short = [doc[:600] for doc in docs]
        kernel = stream_nll(model, short, 1, press, key_bucket=256)
        with torch_attention():
            torch_path = stream_nll(model, short, 1, press, key_bucket=256)
        name = f"{method}_chunk1_600tok_kernels_vs_torch"
        checks[f"{name}_max_rel_nll_diff"] = worst_nll_diff(kernel, torch_path)
        checks[f"{name}_kv_kept"] = [[r["kv_kept"] for r in kernel], [r["kv_kept"] for r in torch_path]]
    # The decisions' kernels (H2O's score and KVzap's stored scores included) against the press's
    # torch expressions: the same evictions, to the bit.
    for method, chunk, n_tokens, threshold in cases:
        short = [doc[:n_tokens] for doc in docs]
        press = kvsweep_press(method, surrogate, threshold, window=64 if chunk == 1 else None)
        fused = stream_nll(model, short, chunk, press)
        with (
            patch.object(decisions, "supports", lambda *_: False),
            patch.object(entry_scores, "supports", lambda *_: False),
        ):
            plain = stream_nll(model, short, chunk, press)
        name = f"{method}_chunk{chunk}_{n_tokens}tok_decision_kernel_vs_torch"
        checks[f"{name}_max_rel_nll_diff"] = worst_nll_diff(fused, plain)
        checks[f"{name}_same_kv_kept"] = [r["kv_kept"] for r in fused] == [r["kv_kept"] for r in plain]
    checks.update(h2o_kernel_checks(model, surrogate, docs, kvsweep_press))
    checks.update(rms_norm_checks(model))
    checks.update(rope_checks(model))
    checks.update(joined_layer_checks(model, surrogate, docs, thresholds, kvsweep_press))
    checks.update(surrogate_kernel_checks(model, surrogate, docs, thresholds, kvsweep_press))
    return checks


def surrogate_kernel_checks(model, surrogate, docs, thresholds, kvsweep_press) -> dict:
    """KVzap's surrogate kernels (`kvsweep.kernels.surrogate_mlp`) against its torch modules: the scores
    of 16 tokens' hidden states (bf16; how many differ, by how much), and whole exact streams and
    generations with the kernels and with the modules (their scores stored by `index_copy_`)."""
    mlp = surrogate.layers[0]
    generator = torch.Generator(device="cuda").manual_seed(8)
    hidden = model.get_decoder().norm(
        torch.randn(16, 1, model.config.hidden_size, device="cuda", generator=generator).bfloat16()
    )
    entry = torch.zeros(16, mlp[2].out_features, 1, device="cuda")
    surrogate_mlp.score_into(entry, hidden, mlp, torch.zeros(1, dtype=torch.long, device="cuda"))
    expected = mlp(hidden).float().transpose(1, 2)
    checks = {
        "surrogate_kernels_vs_modules_share_of_scores_differing_bf16": float((entry != expected).float().mean()),
        "surrogate_kernels_vs_modules_max_abs_diff_bf16": float((entry - expected).abs().max()),
        "surrogate_scores_max_abs_bf16": float(expected.abs().max()),
    }
    press = kvsweep_press("kvzap", surrogate, thresholds["kvzap"], window=64)
    short = [doc[:600] for doc in docs]
    kernels = stream_nll(model, short, 1, press)
    with patch.object(surrogate_mlp, "supports", lambda *_: False):
        modules = stream_nll(model, short, 1, press)
    name = "kvzap_chunk1_600tok_surrogate_kernels_vs_modules"
    checks[f"{name}_max_rel_nll_diff"] = worst_nll_diff(kernels, modules)
    checks[f"{name}_kv_kept"] = [[r["kv_kept"] for r in kernels], [r["kv_kept"] for r in modules]]
    prompts = [docs[0][:700], docs[1][:530]]
    kernels = stream_generate(model, prompts, 128, 96, press)
    with patch.object(surrogate_mlp, "supports", lambda *_: False):
        modules = stream_generate(model, prompts, 128, 96, press)
    checks["kvzap_generate_surrogate_kernels_vs_modules_same_tokens_and_kv"] = kernels == modules
    return checks


def joined_layer_checks(model, surrogate, docs, thresholds, kvsweep_press) -> dict:
    """`kvsweep.kernels.silu_and_mul` and the residual add in the norm's kernel (`rms_norm`): the
    SiLU-and-product kernel and the add against torch on this model's widths in bf16 (elements
    differing); whole streams with the joined layers and with the modules' own forwards."""
    generator = torch.Generator(device="cuda").manual_seed(6)
    width, hidden = model.config.intermediate_size, model.config.hidden_size
    gate_up = (torch.randn(512, 2 * width, device="cuda", generator=generator) * 3).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    x, residual = (torch.randn(2, 512, hidden, device="cuda", generator=generator) * 3).bfloat16()
    norm = model.get_decoder().layers[0].post_attention_layernorm
    total, normed = rms_norm.rms_norm(x, norm.weight, norm.variance_epsilon, residual=residual)
    eager = type(norm).forward(norm, residual + x)
    checks = {
        "silu_and_mul_vs_torch_share_of_elements_differing_bf16": float(
            (silu_and_mul.silu_and_mul(gate_up) != expected).float().mean()
        ),
        "residual_add_in_norm_vs_torch_add_share_differing_bf16": float((total != residual + x).float().mean()),
        "residual_add_in_norm_vs_eager_norm_max_abs_diff_bf16": float((normed.float() - eager.float()).abs().max()),
    }
    for method, threshold in (("baseline", None), ("kvzap", thresholds["kvzap"])):
        for chunk in (128, 1):
            short = [doc[: 1024 if chunk == 128 else 200] for doc in docs]
            press = kvsweep_press(method, surrogate, threshold, window=64 if chunk == 1 else None)
            fused = stream_nll(model, short, chunk, press)
            with (
                patch.object(joined, "on_gpu", lambda weight: False),  # no joined projections
                patch.object(fusions, "hooked", lambda norm: True),  # no residual add in the norm
            ):
                own = stream_nll(model, short, chunk, press)
            name = f"{method}_chunk{chunk}_joined_layers_vs_own_forwards"
            checks[f"{name}_max_rel_nll_diff"] = worst_nll_diff(fused, own)
            checks[f"{name}_kv_kept"] = [[r["kv_kept"] for r in fused], [r["kv_kept"] for r in own]]
    return checks


def rope_checks(model) -> dict:
    """The fused rotary embedding (`kvsweep.kernels.rope`) against transformers' function on this
    model's shapes in bf16 (a chunk of 128 at positions up to 8,192): how far apart and on how many
    elements; and transformers' function against the same arithmetic in torch, each product and
    sum rounded to bf16 (what the kernel does)."""
    config = model.config
    batch, seq, head_dim = 2, 128, config.head_dim
    generator = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(batch, seq, config.num_attention_heads, head_dim, device="cuda", generator=generator)
    k = torch.randn(batch, seq, config.num_key_value_heads, head_dim, device="cuda", generator=generator)
    q, k = q.bfloat16().transpose(1, 2), k.bfloat16().transpose(1, 2)
    positions = torch.randint(0, 8192, (batch, seq), device="cuda", generator=generator)
    cos, sin = model.get_decoder().rotary_emb(q, positions)
    expected = torch.cat([t.flatten() for t in modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)]).float()
    fused = torch.cat([rope.rotate(q, cos, sin).flatten(), rope.rotate(k, cos, sin).flatten()]).float()

    def rounded_each_op(x):
        half = head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        c, s = cos[:, None].float(), sin[:, None].float()
        return ((x.float() * c).bfloat16().float() + (rotated.float() * s).bfloat16().float()).bfloat16()

    emulated = torch.cat([rounded_each_op(q).flatten(), rounded_each_op(k).flatten()]).float()
    return {
        "rope_fused_vs_eager_max_abs_diff_bf16": float((fused - expected).abs().max()),
        "rope_fused_vs_eager_share_of_elements_differing": float((fused != expected).float().mean()),
        "rope_eager_vs_torch_rounded_each_op_share_differing": float((emulated != expected).float().mean()),
        "rope_fused_vs_torch_rounded_each_op_share_differing": float((fused != emulated).float().mean()),
    }


def rms_norm_checks(model) -> dict:
    """The fused RMSNorm (`kvsweep.kernels.rms_norm`) against the eager module, on 4,096 rows of bf16
    activations of this model's width: how far apart, and on how many elements (the mean's sum is
    taken in another order)."""
    norm = model.get_decoder().norm
    generator = torch.Generator(device="cuda").manual_seed(4)
    x = (torch.randn(4096, norm.weight.shape[0], device="cuda", generator=generator) * 3).to(norm.weight.dtype)
    weight = torch.rand(norm.weight.shape, device="cuda", generator=generator).to(norm.weight.dtype) + 0.5
    saved = norm.weight.detach().clone()
    try:
        with torch.no_grad():
            norm.weight.copy_(weight)
            eager = type(norm).forward(norm, x).float()
            fused = rms_norm.rms_norm(x, norm.weight, norm.variance_epsilon).float()
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)
    return {
        "rms_norm_fused_vs_eager_max_abs_diff_bf16": float((fused - eager).abs().max()),
        "rms_norm_fused_vs_eager_share_of_elements_differing": float((fused != eager).float().mean()),
    }


def torch_attention():
    """The engine's attention through torch ops (SDPA, or explicit probabilities) rather than Triton."""
    return patch.object(attention_kernels, "supports", lambda query: False)


def h2o_kernel_checks(model, surrogate, docs, kvsweep_press) -> dict:
    """H2O's Triton kernels in bf16 on a chunk-128 pass and a decoding step of this model's attention
    shape against float64 (output and column sums); then whole streams with the kernels and with the torch path
    (bf16 probabilities)."""
    checks = {}
    for q_len in (128, 1):  # a chunk-128 pass; a decoding step (keys split over programs)
        tag = "" if q_len == 128 else f"_q{q_len}"
        for key, value in h2o_kernels_vs_float64(model.config, q_len).items():
            checks[key.replace("_bf16_", f"{tag}_bf16_")] = value

    short = [doc[:1024] for doc in docs]
    press = kvsweep_press("h2o", surrogate, 2e-3)
    kernels = stream_nll(model, short, 128, press)
    with torch_attention():
        torch_path = stream_nll(model, short, 128, press)
    name = "h2o_chunk128_1024tok_kernels_vs_torch"
    checks[f"{name}_max_rel_nll_diff"] = worst_nll_diff(kernels, torch_path)
    checks[f"{name}_kv_kept"] = [[r["kv_kept"] for r in kernels], [r["kv_kept"] for r in torch_path]]
    return checks


def h2o_kernels_vs_float64(config, q_len: int) -> dict:
    """H2O's kernels in bf16 on one pass of `q_len` queries over 2,125 keys, 30% of them evicted,
    against float64: the output and the column sums, and SDPA's bf16 output for scale."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    batch, k_len, groups = 2, 2125, heads // kv_heads
    generator = torch.Generator(device="cuda").manual_seed(3)
    query = torch.randn(batch, q_len, heads, head_dim, device="cuda", generator=generator).transpose(1, 2)
    key = torch.randn(batch, kv_heads, k_len, head_dim, device="cuda", generator=generator)
    value = torch.randn(batch, kv_heads, k_len, head_dim, device="cuda", generator=generator)
    query, key, value = query.bfloat16(), key.bfloat16(), value.bfloat16()
    # The pass's queries in the last q_len slots.
    evicted = torch.rand(batch, kv_heads, k_len, device="cuda", generator=generator) < 0.3
    position = torch.arange(k_len, device="cuda").repeat(batch, 1)
    seen = KeyVisibility(evicted, position, torch.arange(k_len - q_len, k_len, device="cuda"))
    visible = seen.dense(k_len)
    weights = torch.full((batch, q_len), 1 / groups, device="cuda")
    received = torch.zeros(batch, kv_heads, k_len, device="cuda")
    out = attention_kernels.attend_and_accumulate(query, key, value, seen, weights, head_dim**-0.5, received)
    grouped = query.double().reshape(batch, kv_heads, groups, q_len, head_dim)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", grouped, key.double()) * head_dim**-0.5
    probs = scores.masked_fill(~visible[:, :, None], float("-inf")).softmax(-1)
    expected = (probs * weights[:, None, None, :, None]).sum((2, 3))
    error = (received.double() - expected).abs()
    checks = {"h2o_kernels_bf16_vs_float64_received_max_abs_err_over_mean": float(error.max() / expected.mean())}
    expected_out = torch.einsum("bhgqk,bhkd->bqhgd", probs, value.double()).reshape(out.shape)
    checks["h2o_kernels_bf16_vs_float64_output_max_abs_err"] = float((out.double() - expected_out).abs().max())
    # The same in torch's bf16 SDPA, for scale: what a bf16 kernel is expected to be off by.
    sdpa = attention.masked_sdpa(query.reshape(batch, kv_heads, groups * q_len, head_dim), key, value, visible)
    sdpa = sdpa.reshape(batch, heads, q_len, head_dim).transpose(1, 2)
    checks["sdpa_bf16_vs_float64_output_max_abs_err"] = float((sdpa.double() - expected_out).abs().max())
    return checks


def worst_nll_diff(results, reference) -> float:
    return max(abs(r["nll_sum"] - b["nll_sum"]) / b["nll_sum"] for r, b in zip(results, reference, strict=True))
