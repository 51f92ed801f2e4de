"""Assets of the CPU demo, made locally (nothing downloaded): generated GovReport-like reports, a
word-level tokenizer, a tiny Llama briefly trained on the reports, and a KVzap surrogate.

    python -m kvsweep.demo --output-dir results/demo/assets --documents 16 [--train-steps 150]

Writes OUTPUT/model (model + tokenizer, loadable with from_pretrained), OUTPUT/surrogate
(`KVzapModel.save_pretrained`) and OUTPUT/govreport.jsonl (lines {"id", "report", "summary"}).
The surrogate is a random MLP: the demo exercises the machinery, not KVzap's learned scores.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kvsweep.io import atomic_path

AGENCIES = ["Department of Defense", "Department of Energy", "Internal Revenue Service", "Federal Aviation Administration",
            "Environmental Protection Agency", "Department of Veterans Affairs", "Social Security Administration",
            "Department of Homeland Security", "National Aeronautics and Space Administration", "Department of Education"]  # fmt: skip
PROGRAMS = ["acquisition program", "grant program", "information security program", "modernization effort",
            "oversight process", "cost estimate", "workforce plan", "data system", "contract", "pilot program"]  # fmt: skip
FINDINGS = ["did not fully track costs", "lacked reliable data", "had not set measurable goals", "met most requirements",
            "faced schedule delays", "did not document decisions", "improved its controls", "exceeded its budget",
            "had gaps in oversight", "relied on outdated systems"]  # fmt: skip
VERBS = ["reviewed", "examined", "assessed", "analyzed", "surveyed", "audited"]
RECOMMEND = ["develop a plan", "improve its data", "clarify roles", "report to Congress", "set performance goals",
             "strengthen oversight", "update its guidance", "assess risks"]  # fmt: skip


def _sentence(rng: random.Random, agency: str, program: str) -> str:
    year, amount = rng.randint(2005, 2024), rng.randint(2, 900)
    templates = [
        f"GAO {rng.choice(VERBS)} the {agency} {program} and found that it {rng.choice(FINDINGS)} .",
        f"In fiscal year {year} , the {program} cost about {amount} million dollars .",
        f"Officials at the {agency} stated that the {program} {rng.choice(FINDINGS)} .",
        f"GAO recommends that the {agency} {rng.choice(RECOMMEND)} for the {program} .",
        f"The {agency} agreed with {rng.randint(1, 9)} of the recommendations .",
        f"As of {year} , the {agency} {rng.choice(FINDINGS)} in the {program} .",
    ]
    return rng.choice(templates)


def generate_reports(n: int, seed: int = 0, min_sentences: int = 25, max_sentences: int = 70) -> list[dict]:
    rng = random.Random(seed)
    reports = []
    for i in range(n):
        agency, program = rng.choice(AGENCIES), rng.choice(PROGRAMS)
        # Every fifth report is very short, so the demo exercises `min_length`.
        count = 2 if i % 5 == 4 else rng.randint(min_sentences, max_sentences)
        body = " ".join(_sentence(rng, agency, program) for _ in range(count))
        summary = f"GAO {rng.choice(VERBS)} the {agency} {program} . GAO recommends that the {agency} {rng.choice(RECOMMEND)} ."
        reports.append({"id": f"demo-{i:03d}", "report": body, "summary": summary})
    return reports


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in text.split()} | {str(d) for d in range(10)})
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def train(model, token_lists: list[list[int]], steps: int, seed: int = 0, window: int = 512, batch: int = 8) -> None:
    """Adam steps on windows as long as the demo's documents (so long context is in distribution),
    enough for attention to matter. Each sequence is a report in LongBench's prompt followed by
    its summary, so the model learns to answer the prompt (copying agency and program)."""
    generator = torch.Generator().manual_seed(seed)
    stream = torch.tensor([t for ids in token_lists for t in ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in tqdm(range(steps), desc="train demo model", file=sys.stderr):
        starts = torch.randint(0, len(stream) - window - 1, (batch,), generator=generator)
        ids = torch.stack([stream[s : s + window] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"demo model: final training loss {loss.item():.3f}", file=sys.stderr)


def make_assets(output_dir: str, documents: int, train_steps: int, seed: int = 0) -> None:
    from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel

    from kvsweep.prompts import GOV_REPORT_PROMPT, summarization_prompt_ids

    out = Path(output_dir)
    reports = generate_reports(documents, seed)
    tokenizer = build_tokenizer([GOV_REPORT_PROMPT] + [r["report"] + " " + r["summary"] for r in reports])
    model = build_model(len(tokenizer), seed)
    sequences = [
        summarization_prompt_ids(tokenizer, r["report"], 4096)[0]
        + tokenizer(r["summary"], add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
        for r in reports
    ]
    train(model, sequences, train_steps, seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    torch.manual_seed(seed + 1)
    config = model.config
    surrogate = KVzapModel(KVzapConfig(input_dim=config.hidden_size, output_dim=config.num_key_value_heads,
                                       n_modules=config.num_hidden_layers, hidden_dim=32))  # fmt: skip
    surrogate.save_pretrained(out / "surrogate")
    with atomic_path(out / "govreport.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in reports))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_assets(args.output_dir, args.documents, args.train_steps, args.seed)


if __name__ == "__main__":
    main()
