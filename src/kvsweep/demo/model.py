"""The demo's tiny Llama and its word-level tokenizer: how the bundled model (`model/`, package data)
was made, by `kvsweep demo_assets --train-model DIR`.

The model is bundled rather than trained by each demo because training it is not reproducible
across CPUs: the same code, seed and data trained models whose weights differ by up to 0.5 on two
instruction sets of one machine (AVX-512 and AVX2; in float32 and in float64), and whose demo
tables differ beyond their intervals. The bundled one was trained on an x86 CPU, in float64, for
600 steps (about 150 s on 2 cores).
"""

import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvsweep.core.io import atomic_folder
from kvsweep.demo.reports import CODENAMES, generate_reports
from kvsweep.surrogate.kvzip_targets import REPEAT_REQUEST, repeat_prompt
from kvsweep.tasks.prompts import GOV_REPORT_PROMPT, summarization_prompt_ids


def build_tokenizer(texts: list[str]):
    words = {w for text in texts for w in text.split()} | {str(d) for d in range(10)}
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", "<pad>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(vocab_size: int, seed: int = 0):
    """Two layers are enough to learn to copy (an induction circuit), and train in seconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def training_sequences(tokenizer, reports: list[dict], length: int = 512) -> list[list[int]]:
    """What the demo model learns from, at most `length` tokens each: every report as a document
    (perplexity), in LongBench's prompt followed by its summary and EOS (summarization: answer,
    then stop), and inside KVzip's repeat prompt (so that its attention while repeating, which the
    KVzap surrogate learns from, is a copying model's)."""
    sequences = []
    for report in reports:
        summary = tokenizer(report["summary"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        body = tokenizer(report["report"], add_special_tokens=False)["input_ids"]
        sequences.append([tokenizer.bos_token_id, *body][:length])
        sequences.append(summarization_prompt_ids(tokenizer, report["report"], length - len(summary))[0] + summary)
        sequences.append(repeat_prompt(tokenizer, body[: (length - 16) // 2]).input_ids[:length])
    return sequences


def train(model, sequences: list[list[int]], steps: int, seed: int = 0, batch: int = 8, lr: float = 5e-3) -> None:
    """AdamW with a one-cycle schedule on batches of whole sequences (padded), each read from its
    start, so that the model sees prompts, summaries and their end as they come."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    pad = model.config.pad_token_id
    model.train()
    for _ in tqdm(range(steps), desc="train demo model", file=sys.stderr):
        chosen = [sequences[i] for i in torch.randint(0, len(sequences), (batch,), generator=generator)]
        width = max(map(len, chosen))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chosen])
        labels = torch.tensor([s + [-100] * (width - len(s)) for s in chosen])
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    print(f"demo model: final training loss {loss.item():.3f}", file=sys.stderr)


def training_texts(documents: int, seed: int, training_reports: int) -> tuple[list[dict], list[str]]:
    """The reports the model learns from (`training_reports` of their own, another seed: the demo's
    `documents` reports are never trained on) and the texts its vocabulary is made of."""
    reports = generate_reports(documents, seed)
    lessons = generate_reports(training_reports, seed + 1)
    texts = [GOV_REPORT_PROMPT, REPEAT_REQUEST] + [r["report"] + " " + r["summary"] for r in reports + lessons]
    # Every amount, year and code name the generator can draw, seen in training or not.
    texts.append(" ".join([*map(str, range(10, 100)), *map(str, range(2005, 2025)), *CODENAMES]))
    return lessons, texts


def train_model(output_dir: str, train_steps: int = 600, documents: int = 48, seed: int = 0,
                training_reports: int = 200) -> None:  # fmt: skip
    """The demo's model and tokenizer, trained and written to `output_dir`. The weights are
    trained in float64 and saved in float32."""
    lessons, texts = training_texts(documents, seed, training_reports)
    tokenizer = build_tokenizer(texts)
    model = build_model(len(tokenizer), seed).double()
    train(model, training_sequences(tokenizer, lessons), train_steps, seed)
    with atomic_folder(output_dir) as staging:
        model.float().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
