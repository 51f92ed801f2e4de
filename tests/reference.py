"""An independent, slow reference of the method semantics (design brief, section 4).

Everything is float64 and explicit: a Llama decoder written out from the weights, attention as a
softmax per query and per head over an explicit list of visible keys, an explicit undecided /
kept / evicted state per (layer, KV head, position), and decisions made after each chunk's full
forward pass. It shares no code with the engine.
"""

import functools
import hashlib
import math
import struct

import numpy as np
import torch

UNDECIDED, KEPT, EVICTED = 0, 1, 2


class Weights:
    """The float64 numpy weights of a `LlamaForCausalLM`, and a KVzap surrogate if given."""

    def __init__(self, model, surrogate=None):
        cfg = model.config
        sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
        self.n_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.theta = cfg.rope_parameters["rope_theta"]
        self.sd = sd
        self.lm_head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        self.surrogate = None
        if surrogate is not None:
            self.surrogate = []
            for layer in surrogate.layers:
                linears = (
                    [layer]
                    if isinstance(layer, torch.nn.Linear)
                    else [m for m in layer if isinstance(m, torch.nn.Linear)]
                )
                self.surrogate.append(
                    [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linears]
                )

    def layer(self, index, name):
        return self.sd[f"model.layers.{index}.{name}.weight"]


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, theta):
    """x: (d,) at position pos; rotate_half convention of Llama."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    angles = np.concatenate([pos * inv_freq, pos * inv_freq])
    half = d // 2
    rotated = np.concatenate([-x[half:], x[:half]])
    return x * np.cos(angles) + rotated * np.sin(angles)


def surrogate_scores(layer_mlp, h):
    """KVzap surrogate: Linear, GELU (erf), Linear; or a single Linear. h: (hidden,) -> (kv_heads,)."""
    out = h
    for i, (w, b) in enumerate(layer_mlp):
        out = w @ out + b
        if i < len(layer_mlp) - 1:
            out = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in out])
    return out


MASK32 = 0xFFFFFFFF


def mix32(x):
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32
    x = ((x ^ (x >> 15)) * 0x1B873593) & MASK32
    return x ^ (x >> 16)


def random_score(seed, tokens, layer, head, position):
    """Random eviction's score: 24 bits of a hash chain over (seed, document, layer, head, position),
    the document named by the first 4 bytes (little-endian) of the SHA-256 of its int64 tokens."""
    document = int.from_bytes(hashlib.sha256(struct.pack(f"<{len(tokens)}q", *tokens)).digest()[:4], "little")
    h = mix32(seed & MASK32)
    for value in (document, layer, head, position):
        h = mix32((h ^ (value + 0x9E3779B9 + ((h << 6) & MASK32) + (h >> 2))) & MASK32)
    return (h >> 8) / float(1 << 24)


@functools.cache
def average_rope(position, n_future, d, theta):
    """RoPE's rotation matrix averaged over positions [position, position + n_future)."""
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    half = d // 2
    total = np.zeros((d, d))
    for t in range(position, position + n_future):
        angles = np.concatenate([t * inv_freq, t * inv_freq])
        rotation = np.diag(np.cos(angles))
        for i in range(half):  # x rotated: x_i cos - x_{i+half} sin (i < half), x_i cos + x_{i-half} sin
            rotation[i, i + half] = -np.sin(angles[i + half])
            rotation[i + half, i] = np.sin(angles[i])
        total += rotation
    return total / n_future


def expected_attention_scores(W, keys, values, state, queries, e, g, sinks, options):
    """Expected Attention's score of every visible key j (sinks <= j < e) of KV head g: the softmax
    over those keys of the expected logit of a future query, mean over the group's heads, times
    ||v_j||. Query statistics: mean and (population) covariance of the pre-RoPE queries counted so
    far, rotated by RoPE averaged over positions [e, e + n_future)."""
    G = W.heads // W.kv_heads
    d = W.head_dim
    visible = [j for j in range(sinks, e) if state[g, j] != EVICTED]
    if not visible:
        return {}
    rotation = average_rope(e, options["n_future_positions"], d, W.theta)
    probs = np.zeros(len(visible))
    for head in range(g * G, (g + 1) * G):
        counted = np.array(queries[head]) if queries[head] else np.zeros((0, d))
        mean = counted.mean(0) if len(counted) else np.zeros(d)
        cov = (counted - mean).T @ (counted - mean) / len(counted) if len(counted) else np.zeros((d, d))
        mean, cov = rotation @ mean, rotation @ cov @ rotation.T
        logits = np.array([mean @ keys[j, g] / math.sqrt(d) for j in visible])
        if options["use_covariance"]:
            logits += np.array([keys[j, g] @ cov @ keys[j, g] / d / 2 for j in visible])
        p = np.exp(logits - logits.max())
        probs += p / p.sum() / G
    if options["use_vnorm"]:
        probs = probs * np.array([np.linalg.norm(values[j, g]) for j in visible])
    return dict(zip(visible, probs, strict=True))


EA_DEFAULTS = {"n_future_positions": 512, "use_covariance": True, "use_vnorm": True}
ENTRY_SCORED = ("kvzap", "kvzap_no_sink", "knorm", "random", "streaming_llm")


def reference_stream(W: Weights, tokens, chunk, method, threshold, window, sinks, options=None):
    """Return (nll_sum, kept counts dict, decision margins) for one document. `options`: random's
    seed, Expected Attention's n_future_positions / use_covariance / use_vnorm."""
    options = {"seed": 42, **EA_DEFAULTS, **(options or {})}
    if method == "streaming_llm":  # every position scores 0 and is evicted: threshold +inf
        threshold = math.inf
    n = len(tokens)
    G = W.heads // W.kv_heads
    scale = W.head_dim**-0.5
    keys = [np.zeros((n, W.kv_heads, W.head_dim)) for _ in range(W.n_layers)]
    values = [np.zeros((n, W.kv_heads, W.head_dim)) for _ in range(W.n_layers)]
    state = [np.full((W.kv_heads, n), UNDECIDED) for _ in range(W.n_layers)]
    entry_score = [np.zeros((W.kv_heads, n)) for _ in range(W.n_layers)]
    received = [np.zeros((W.kv_heads, n)) for _ in range(W.n_layers)]
    queries = [[[] for _ in range(W.heads)] for _ in range(W.n_layers)]  # pre-RoPE, positions >= sinks
    nll = 0.0
    margins = []
    embed = W.sd["model.embed_tokens.weight"]

    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x = np.stack([embed[t] for t in tokens[s:e]])
        for layer in range(W.n_layers):
            h = np.stack([rms_norm(row, W.sd[f"model.layers.{layer}.input_layernorm.weight"], W.eps) for row in x])
            q = (h @ W.layer(layer, "self_attn.q_proj").T).reshape(len(x), W.heads, W.head_dim)
            k = (h @ W.layer(layer, "self_attn.k_proj").T).reshape(len(x), W.kv_heads, W.head_dim)
            v = (h @ W.layer(layer, "self_attn.v_proj").T).reshape(len(x), W.kv_heads, W.head_dim)
            for i in range(len(x)):
                p = s + i
                for head in range(W.heads):
                    if p >= sinks:
                        queries[layer][head].append(q[i, head].copy())
                    q[i, head] = rope(q[i, head], p, W.theta)
                for g in range(W.kv_heads):
                    keys[layer][p, g] = rope(k[i, g], p, W.theta)
                    values[layer][p, g] = v[i, g]
                    if method.startswith("kvzap"):
                        entry_score[layer][g, p] = surrogate_scores(W.surrogate[layer], h[i])[g]
                    elif method == "knorm":
                        entry_score[layer][g, p] = -np.linalg.norm(keys[layer][p, g])
                    elif method == "random":
                        entry_score[layer][g, p] = random_score(options["seed"], tokens, layer, g, p)
            attn = np.zeros((len(x), W.heads, W.head_dim))
            for i in range(len(x)):
                p = s + i
                for head in range(W.heads):
                    g = head // G
                    visible = [j for j in range(p + 1) if state[layer][g, j] != EVICTED]
                    logits = np.array([q[i, head] @ keys[layer][j, g] * scale for j in visible])
                    probs = np.exp(logits - logits.max())
                    probs /= probs.sum()
                    attn[i, head] = sum(pr * values[layer][j, g] for pr, j in zip(probs, visible, strict=True))
                    for pr, j in zip(probs, visible, strict=True):
                        received[layer][g, j] += pr / G
            x = x + attn.reshape(len(x), -1) @ W.layer(layer, "self_attn.o_proj").T
            h = np.stack(
                [rms_norm(row, W.sd[f"model.layers.{layer}.post_attention_layernorm.weight"], W.eps) for row in x]
            )
            gate = h @ W.layer(layer, "mlp.gate_proj").T
            up = h @ W.layer(layer, "mlp.up_proj").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ W.layer(layer, "mlp.down_proj").T

        # Next-token NLL of the chunk's positions.
        for i in range(len(x)):
            p = s + i
            if p + 1 < n:
                logits = W.lm_head @ rms_norm(x[i], W.sd["model.norm.weight"], W.eps)
                logz = logits.max() + np.log(np.exp(logits - logits.max()).sum())
                nll += logz - logits[tokens[p + 1]]

        # After the chunk's forward pass: decide every undecided j < e - window, once.
        if method == "baseline":
            continue
        for layer in range(W.n_layers):
            for g in range(W.kv_heads):
                if method == "expected_attention":  # every score first: the softmax sees the cache as it is
                    expected = expected_attention_scores(
                        W, keys[layer], values[layer], state[layer], queries[layer], e, g, sinks, options
                    )
                for j in range(e - window):
                    if state[layer][g, j] != UNDECIDED:
                        continue
                    if j < sinks:
                        state[layer][g, j] = KEPT
                        continue
                    if method in ENTRY_SCORED:
                        score = entry_score[layer][g, j]
                    elif method == "expected_attention":
                        score = expected[j]
                    else:  # h2o: mean attention received
                        score = received[layer][g, j] / (e - j)
                    if not math.isinf(threshold):
                        margins.append(abs(score - threshold))
                    state[layer][g, j] = EVICTED if score < threshold else KEPT

    evicted = sum((st == EVICTED).sum() for st in state)
    evicted_compressible = sum((st[:, sinks : max(sinks, n - window)] == EVICTED).sum() for st in state)
    total = W.n_layers * W.kv_heads * n
    total_compressible = W.n_layers * W.kv_heads * max(0, n - window - sinks)
    counts = {
        "kv_total": total,
        "kv_kept": total - evicted,
        "kv_total_compressible": total_compressible,
        "kv_kept_compressible": total_compressible - evicted_compressible,
    }
    return nll, counts, margins
