"""Assets of the CPU demo (nothing downloaded): generated GovReport-like reports, and a tiny Llama
with its word-level tokenizer that copies facts from far back, summarizes and stops, and repeats
a document.

    python -m kvsweep.demo --output-dir results/demo/demo_assets --documents 48
    python -m kvsweep.demo --train-model DIR [--train-steps 600]      (to make the bundled model again)

The first writes OUTPUT/govreport.jsonl (lines {"id", "report", "summary"}) and OUTPUT/model, a
copy of the model bundled with kvsweep (`kvsweep/demo_model`, loadable with from_pretrained). The
model is bundled rather than trained by each demo because training it is not reproducible across
CPUs: the same code, seed and data trained models whose weights differ by up to 0.5 on two
instruction sets of one machine (AVX-512 and AVX2; in float32 and in float64), and whose demo
tables differ beyond their intervals. `--train-model` is how the bundled one was made (on an x86
CPU, float64, 600 steps, about 150 s on 2 cores). The demo's KVzap surrogate is trained on this
model by the workflow's `train_surrogate` rule, as a study's would be.
"""

import argparse
import json
import random
import sys
from importlib.resources import files
from pathlib import Path

import torch
from tqdm import tqdm

from kvsweep.io import atomic_folder, atomic_path
from kvsweep.stages import start_job

AGENCIES = ["Department of Defense", "Department of Energy", "Internal Revenue Service", "Federal Aviation Administration",
            "Environmental Protection Agency", "Department of Veterans Affairs", "Social Security Administration",
            "Department of Homeland Security", "Department of Education", "Forest Service"]  # fmt: skip
PROGRAMS = ["acquisition program", "grant program", "security program", "modernization effort", "oversight process",
            "data system", "pilot program", "workforce plan"]  # fmt: skip
CODENAMES = ["Atlas", "Beacon", "Cedar", "Delta", "Ember", "Falcon", "Granite", "Harbor", "Iris", "Juniper", "Keystone",
             "Lantern", "Meridian", "Nova", "Orion", "Pioneer", "Quartz", "Raven", "Summit", "Titan", "Vector",
             "Willow", "Zephyr", "Aurora"]  # fmt: skip
FINDINGS = ["did not fully track costs", "lacked reliable data", "had not set measurable goals", "faced schedule delays",
            "did not document decisions", "exceeded its budget", "had gaps in oversight", "relied on outdated systems"]  # fmt: skip
RECOMMEND = ["develop a plan", "improve its data", "clarify roles", "report to Congress", "set performance goals",
             "strengthen oversight", "update its guidance", "assess risks"]  # fmt: skip
VERBS = ["reviewed", "examined", "assessed", "audited"]
SPEAKERS = ["Officials", "Staff", "Managers", "Contractors", "Auditors", "Users"]
SAID = ["said", "noted", "reported", "stated", "told us"]
REMARKS = ["that the work was complex", "that funding was uncertain", "that guidance was unclear",
           "that training was needed", "that staffing was limited", "that data were incomplete",
           "that costs were rising", "that schedules slipped"]  # fmt: skip


def generate_report(rng: random.Random, index: int) -> dict:
    """A report whose facts (agency, program, its code name, budget, finding, recommendation) are
    stated in its first sentences and recalled now and then in a body of remarks: predicting a
    recall needs the facts' tokens, which lie far behind any local window. The summary restates
    the facts, so a model that lost them cannot summarize."""
    agency, program, code = rng.choice(AGENCIES), rng.choice(PROGRAMS), rng.choice(CODENAMES)
    finding, recommendation, verb = rng.choice(FINDINGS), rng.choice(RECOMMEND), rng.choice(VERBS)
    year, amount = rng.randint(2005, 2024), rng.randint(10, 99)
    sentences = [
        f"GAO {verb} the {agency} {program} , known as {code} .",
        f"The {code} began in {year} with a budget of {amount} million dollars .",
        f"GAO found that the {code} {finding} .",
        f"GAO recommends that the {agency} {recommendation} .",
    ]
    # Every fifth report is very short, so the demo exercises `min_length`.
    for _ in range(2 if index % 5 == 4 else rng.randint(25, 60)):
        draw = rng.random()
        if draw < 0.2:
            sentences.append(f"Officials said the {code} {rng.choice(FINDINGS)} .")
        elif draw < 0.32:
            sentences.append(f"The {code} budget was {amount} million dollars in {year} .")
        elif draw < 0.4:
            sentences.append(f"The {agency} agreed to {recommendation} .")
        else:
            sentences.append(f"{rng.choice(SPEAKERS)} {rng.choice(SAID)} {rng.choice(REMARKS)} .")
    summary = (
        f"GAO {verb} the {agency} {program} known as {code} . GAO found that the {code} {finding} . "
        f"GAO recommends that the {agency} {recommendation} ."
    )
    return {"id": f"demo-{index:03d}", "report": " ".join(sentences), "summary": summary}


def generate_reports(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [generate_report(rng, i) for i in range(n)]


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

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
    from transformers import LlamaConfig, LlamaForCausalLM

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
    from kvsweep.kvzip_targets import repeat_prompt
    from kvsweep.prompts import summarization_prompt_ids

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
    from kvsweep.kvzip_targets import REPEAT_REQUEST
    from kvsweep.prompts import GOV_REPORT_PROMPT

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


BUNDLED_MODEL = files("kvsweep") / "demo_model"


def make_assets(output_dir: str, documents: int, seed: int = 0) -> None:
    """The demo's reports, and a copy of the bundled model beside them."""
    out = Path(output_dir)
    with atomic_folder(out / "model") as staging:
        for item in BUNDLED_MODEL.iterdir():
            (staging / item.name).write_bytes(item.read_bytes())
    with atomic_path(out / "govreport.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in generate_reports(documents, seed)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.demo", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output-dir", help="write the demo's reports and the bundled model here")
    target.add_argument("--train-model", metavar="DIR", help="train the demo model and its tokenizer into DIR")
    parser.add_argument(
        "--documents", type=int, default=48, help="reports of the demo (the bundled tokenizer knows 48)"
    )
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train_model:
        train_model(args.train_model, args.train_steps, args.documents, args.seed)
    else:
        make_assets(args.output_dir, args.documents, args.seed)


if __name__ == "__main__":
    start_job("kvsweep.demo")
    main()
