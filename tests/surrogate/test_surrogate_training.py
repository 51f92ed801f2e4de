"""Training a KVzap surrogate: KVzip+ targets against a direct float64 computation, the repeat
prompt, the fits against independent solutions, the job's refusals, and the demo's trained surrogate
loaded through kvpress and judged on held-out documents."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.stats import spearmanr

from kvsweep.core.errors import KvsweepError
from kvsweep.surrogate.fit import fit_linear, fit_mlp
from kvsweep.surrogate.kvzip_targets import KVzipTargetCollector, RepeatPrompt, repeat_prompt

from conftest import kvsweep, random_documents, tiny_llama


def eager_float64_llama(seed=0):
    model = tiny_llama(seed).double()
    model.set_attn_implementation("eager")
    return model


def reference_targets(model, prompt: RepeatPrompt, window: int | None = None) -> np.ndarray:
    """KVzip+ by its definition, one (layer, KV head, document position) at a time, in float64:
    the layer's own q/k/v projections, rotary embedding written out, causal softmax, then
    max over the copy's queries and the KV head's query heads of a(t->i) / ||x_t|| * ||W_o,h v_i||."""
    config = model.config
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    group = heads // kv_heads
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    T = ids.shape[1]
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, d/2)

    def rotate(x):  # x: (T, d), Llama's rotary embedding (halves rotated)
        x1, x2 = x[:, : d // 2], x[:, d // 2 :]
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    doc = range(prompt.document.start, prompt.document.stop)
    rep = range(prompt.repeat.start, prompt.repeat.stop)
    out = np.zeros((len(model.model.layers), kv_heads, len(doc)))
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        with torch.no_grad():
            x = layer.input_layernorm(hidden[index])[0]  # (T, hidden): what enters attention
            q = attn.q_proj(x).view(T, heads, d)
            k = attn.k_proj(x).view(T, kv_heads, d)
            v = attn.v_proj(x).view(T, kv_heads, d)
        w_o = attn.o_proj.weight  # (hidden, heads * d)
        for h in range(heads):
            kv = h // group
            qh, kh = rotate(q[:, h]), rotate(k[:, kv])
            logits = qh @ kh.T / math.sqrt(d)
            logits = logits.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            if window is not None:  # a sliding window: query t sees keys t - window + 1 .. t
                logits = logits.masked_fill(torch.tril(torch.ones(T, T, dtype=torch.bool), -window), float("-inf"))
            a = torch.softmax(logits, dim=-1)
            for j, i in enumerate(doc):
                wov = torch.linalg.norm(w_o[:, h * d : (h + 1) * d] @ v[i, kv]).item()
                best = max(a[t, i].item() / torch.linalg.norm(x[t]).item() * wov for t in rep)
                out[index, kv, j] = max(out[index, kv, j], best) if h % group else best
    return np.log(out)


def test_kvzip_plus_targets_match_a_direct_float64_computation():
    model = eager_float64_llama()
    document = random_documents([11], seed=5)[0]
    prompt = RepeatPrompt([1, *document, 7, 8, *document, 9], slice(1, 12), slice(14, 25))
    features, targets = KVzipTargetCollector(model).collect(prompt)
    expected = reference_targets(model, prompt)  # (layers, KV heads, positions)
    assert targets.shape == (11, 2, 2) and features.shape == (11, 2, 64)
    np.testing.assert_allclose(targets.permute(1, 2, 0).double().numpy(), expected, rtol=1e-6, atol=1e-9)
    # The features are what enters each layer's attention at the document's positions.
    with torch.no_grad():
        hidden = model(torch.tensor([prompt.input_ids]), output_hidden_states=True).hidden_states
        for index, layer in enumerate(model.model.layers):
            np.testing.assert_allclose(features[:, index], layer.input_layernorm(hidden[index])[0, 1:12], rtol=1e-12)


def test_sliding_window_targets_read_every_positions_value():
    """A model with a sliding window: the cache must still hold every position's value (a cache
    built from the config keeps only the window's), and keys outside every copy query's window
    get log(0)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           initializer_range=0.15, max_position_embeddings=256)  # fmt: skip
    model = MistralForCausalLM(config).double().eval()
    model.set_attn_implementation("eager")
    document = random_documents([20], seed=6)[0]
    prompt = RepeatPrompt([1, *document, 7, 8, *document], slice(1, 21), slice(23, 43))
    _, targets = KVzipTargetCollector(model).collect(prompt)
    expected = reference_targets(model, prompt, window=16)
    np.testing.assert_allclose(targets.permute(1, 2, 0).double().numpy(), expected, rtol=1e-6, atol=1e-9)
    assert np.isinf(expected).any() and np.isfinite(expected).any()


def test_log_zero_targets_are_set_to_their_layers_smallest(tmp_path):
    from kvsweep.stages.train_surrogate import collect

    class Fixed:
        def collect(self, prompt):
            y = torch.tensor([[[-1.0, -2.0]], [[float("-inf"), -3.0]], [[-0.5, float("-inf")]]])  # (3, 1, 2)
            return torch.zeros(3, 1, 4), y

    class Tokenizer:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1, 5] if add_special_tokens else [5]}

    features, targets, clamped = collect(Fixed(), Tokenizer(), [{"id": "a", "input_ids": [1, 4, 5, 6]}], 3, 0, "t")
    assert clamped == 2 and features.shape == (3, 1, 4)
    assert sorted(targets.flatten().tolist()) == [-3.0, -3.0, -3.0, -2.0, -1.0, -0.5]


def test_kvzip_targets_need_eager_attention(model):
    with pytest.raises(ValueError, match="eager"):
        KVzipTargetCollector(model)


def test_repeat_prompt_holds_two_identical_copies():
    from kvsweep.demo.model import build_tokenizer

    tokenizer = build_tokenizer(
        ["the report said that costs rose", "Repeat the previous context exactly.", "user assistant :"]
    )
    document = tokenizer("the report said that costs rose", add_special_tokens=False)["input_ids"]
    plain = repeat_prompt(tokenizer, document)
    assert plain.input_ids[0] == tokenizer.bos_token_id  # this tokenizer starts its inputs with BOS
    assert plain.input_ids[plain.document] == document == plain.input_ids[plain.repeat]
    assert plain.repeat.start > plain.document.stop  # the request lies between the copies
    # With a chat template: the user's message holds the document and the request, the assistant's
    # answer the copy.
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    chat = repeat_prompt(tokenizer, document)
    assert chat.input_ids[chat.document] == document == chat.input_ids[chat.repeat]
    between = tokenizer.convert_ids_to_tokens(chat.input_ids[chat.document.stop : chat.repeat.start])
    assert between[:5] == ["Repeat", "the", "previous", "context", "exactly."] and "assistant" in between
    assert chat.input_ids[: chat.document.start] == tokenizer("<s> user :", add_special_tokens=False)["input_ids"]


def test_linear_fit_is_ridge_regression():
    """Against ridge solved as least squares on the augmented system [X 1; sqrt(alpha) I 0]."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, 8, generator=generator, dtype=torch.float64)
    y = torch.einsum("nld,ldk->nlk", x, torch.randn(2, 8, 3, generator=generator, dtype=torch.float64)) + 0.5
    y += 0.1 * torch.randn(y.shape, generator=generator, dtype=torch.float64)
    surrogate = fit_linear(x, y, "cpu", alpha=1.0)
    for layer in range(2):
        a = np.hstack([x[:, layer].numpy(), np.ones((300, 1))])
        a = np.vstack([a, np.hstack([np.eye(8), np.zeros((8, 1))])])  # sqrt(1) I: the intercept is not penalized
        b = np.vstack([y[:, layer].numpy(), np.zeros((8, 3))])
        solution = scipy.linalg.lstsq(a, b)[0]
        module = surrogate.layers[layer]
        np.testing.assert_allclose(module.weight.detach().numpy(), solution[:8].T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(module.bias.detach().numpy(), solution[8], rtol=1e-5, atol=1e-5)


def test_mlp_fit_learns_a_nonlinear_target():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, 6, generator=generator)
    y = torch.stack([x[:, 0, :2].abs().sum(-1), x[:, 1, 2:4].pow(2).sum(-1)], dim=1)[..., None]
    surrogate = fit_mlp(x[:3000], y[:3000], "cpu", hidden_dim=32, epochs=40, learning_rate=1e-2, batch_size=128)
    with torch.no_grad():
        predicted = surrogate(x[3000:])
    for layer in range(2):
        truth = y[3000:, layer, 0]
        r2 = 1 - ((predicted[:, layer, 0] - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
        assert r2 > 0.9, f"layer {layer}: R^2 {r2:.3f}"


def test_training_refuses_documents_that_are_evaluated(tmp_path):
    from kvsweep.stages.train_surrogate import TrainSurrogateOptions, split_documents

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "input_ids": [1, 2, 3]}) + "\n" for i in range(5)))
    study = tmp_path / "documents.jsonl"
    study.write_text(json.dumps({"id": "x"}) + "\n" + json.dumps({"id": "d3"}) + "\n")
    train, held_out = split_documents(TrainSurrogateOptions("m", str(data), "o", validation_documents=2))
    assert [d["id"] for d in train] == ["d0", "d1", "d2"] and [d["id"] for d in held_out] == ["d3", "d4"]
    with pytest.raises(KvsweepError, match="d3.*must not learn"):
        split_documents(TrainSurrogateOptions("m", str(data), "o", validation_documents=2, exclude=[str(study)]))
    with pytest.raises(KvsweepError, match="none would be left to train on"):
        split_documents(TrainSurrogateOptions("m", str(data), "o", validation_documents=5))


def test_a_surrogate_trained_on_a_tiny_model_loads_in_kvpress(tmp_path, model_dir):
    """The job end to end on a random tiny model: a folder kvpress loads, with its validation record."""
    from kvpress import KVzapPress
    from kvpress.presses.kvzap_press import KVzapModel

    data = tmp_path / "docs.jsonl"
    documents = random_documents([40, 50, 45, 60], seed=3)
    data.write_text("".join(json.dumps({"id": f"d{i}", "input_ids": d}) + "\n" for i, d in enumerate(documents)))
    # The tiny model's folder has no tokenizer: give it the demo's word-level one.
    from kvsweep.demo.model import build_tokenizer

    build_tokenizer(["a b c"]).save_pretrained(model_dir)
    out = tmp_path / "surrogate"
    kvsweep("train_surrogate", "--model", model_dir, "--data", data, "--validation-documents", 1, "--hidden-dim", 8,
            "--epochs", 2, "--tokens-per-document", 16, "--output", out)  # fmt: skip
    record = json.loads((out / "validation.json").read_text())
    assert record["training_positions"] == 48 and record["held_out_positions"] == 16
    assert record["layers"][1]["layer"] == 1
    assert (tmp_path / "surrogate.stages.json").exists()
    press = KVzapPress(model_type="mlp")
    press.kvzap_model = KVzapModel.from_pretrained(out)
    assert press.kvzap_model.config.hidden_dim == 8 and press.kvzap_model.config.n_modules == 2


def held_out_agreement(results, surrogate_path) -> tuple[float, float]:
    """Mean over layers of the Spearman correlation, on the held-out demo documents, between KVzip+
    targets and kvpress's `KVzapPress.score` with the trained surrogate, and with an untrained one."""
    from kvpress import KVzapPress
    from kvpress.presses.kvzap_press import KVzapModel

    from kvsweep.core.io import read_jsonl
    from kvsweep.engine.models import load_model, load_tokenizer

    record = json.loads((surrogate_path / "validation.json").read_text())
    model = load_model(str(results / "demo_assets" / "model"), attention="eager")
    tokenizer = load_tokenizer(str(results / "demo_assets" / "model"))
    held_out = [d for d in read_jsonl(results / "kvzap_surrogate/data/perplexity/shard000.jsonl")
                if d["id"] in record["held_out_documents"]]  # fmt: skip
    assert len(held_out) == len(record["held_out_documents"]) > 0
    trained = KVzapPress(model_type="mlp")
    trained.kvzap_model = KVzapModel.from_pretrained(surrogate_path)
    untrained = KVzapPress(model_type="mlp")
    torch.manual_seed(0)
    untrained.kvzap_model = KVzapModel(trained.kvzap_model.config)
    collector = KVzipTargetCollector(model)
    found = {"trained": [], "untrained": []}
    for doc in held_out:
        features, targets = collector.collect(repeat_prompt(tokenizer, doc["input_ids"][1:]))
        for name, press in (("trained", trained), ("untrained", untrained)):
            for layer, block in enumerate(model.model.layers):
                with torch.no_grad():  # (batch, KV heads, positions), as the press scores a layer
                    scores = press.score(block.self_attn, features[None, :, layer], None, None, None, {})
                found[name].append(spearmanr(scores[0].T.flatten(), targets[:, layer].flatten()).statistic)
    return float(np.mean(found["trained"])), float(np.mean(found["untrained"]))


@pytest.mark.slow
def test_the_demos_trained_surrogate_predicts_kvzip_targets_on_held_out_documents(demo_run):
    workdir, _ = demo_run
    results = workdir / "results" / "demo"
    surrogate = results / "kvzap_surrogate" / "mlp"
    trained, untrained = held_out_agreement(results, surrogate)
    print(f"held-out Spearman, trained {trained:.3f}, untrained {untrained:.3f}")
    assert trained >= 0.6 > abs(untrained)
    record = json.loads((surrogate / "validation.json").read_text())
    assert record["mean_spearman"] == pytest.approx(trained, abs=0.1)
    # Never a document the study evaluates or calibrates on.
    used = set(record["training_documents"]) | set(record["held_out_documents"])
    for listing in [*results.glob("data/*/documents.jsonl"), results / "calibration/data/perplexity/documents.jsonl"]:
        assert not used & {json.loads(line)["id"] for line in listing.read_text().splitlines()}, listing
    assert len(used) == 20


def test_the_document_check_job_names_a_shared_document(tmp_path, capsys):
    ours, study = tmp_path / "ours.jsonl", tmp_path / "study.jsonl"
    ours.write_text("".join(json.dumps({"id": f"s{i}"}) + "\n" for i in range(3)))
    study.write_text("".join(json.dumps({"id": f"d{i}"}) + "\n" for i in range(4)))
    kvsweep("check_surrogate_documents", "--documents", ours, "--exclude", study, "--output", tmp_path / "ok.txt")
    assert (
        tmp_path / "ok.txt"
    ).read_text() == "3 surrogate documents, none among the 4 documents evaluated or calibrated on\n"
    study.write_text(json.dumps({"id": "s2"}) + "\n")
    with pytest.raises(SystemExit):
        kvsweep("check_surrogate_documents", "--documents", ours, "--exclude", study, "--output", tmp_path / "bad.txt")
    assert "'s2'" in capsys.readouterr().err and not (tmp_path / "bad.txt").exists()
