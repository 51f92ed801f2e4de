"""The demo's assets: its reports, and the tiny model bundled with kvsweep."""

import json
import stat

import torch

from kvsweep.demo import BUNDLED_MODEL
from kvsweep.demo.model import train_model
from kvsweep.demo.reports import generate_reports
from kvsweep.stages.demo_assets import make_assets


def test_the_assets_are_the_bundled_model_and_the_generated_reports(tmp_path):
    make_assets(str(tmp_path), 48)
    copied = {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir()}
    assert copied == {item.name: item.read_bytes() for item in BUNDLED_MODEL.iterdir()}
    assert all(stat.S_IMODE((tmp_path / "model" / name).stat().st_mode) & 0o044 == 0o044 for name in copied)
    reports = [json.loads(line) for line in (tmp_path / "govreport.jsonl").read_text().splitlines()]
    assert reports == generate_reports(48)


def test_the_bundled_model_reads_the_demo_reports_it_never_saw(tmp_path):
    """Its tokenizer knows every word of them, and it predicts them far better than chance (its
    vocabulary has 285 words): the bundled weights are the trained ones."""
    from kvsweep.engine.models import load_model, load_tokenizer

    make_assets(str(tmp_path), 48)
    tokenizer = load_tokenizer(str(tmp_path / "model"))
    model = load_model(str(tmp_path / "model"))
    ids = [tokenizer(r["report"])["input_ids"] for r in generate_reports(48)[:4]]
    assert all(tokenizer.unk_token_id not in doc for doc in ids)
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([doc]), labels=torch.tensor([doc])).loss.item() for doc in ids]
    assert max(losses) < 1.5, losses


def test_training_the_demo_model_again_makes_the_bundled_tokenizer(tmp_path):
    train_model(str(tmp_path / "model"), train_steps=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "model" / name).read_bytes() == (BUNDLED_MODEL / name).read_bytes(), name
