"""The CPU demo's assets: its generated reports, and a copy of the tiny model bundled with kvsweep
beside them (`kvsweep.demo`); or, for a developer, that model trained again."""

import json
from dataclasses import dataclass
from pathlib import Path

from kvsweep.core.io import atomic_folder, atomic_path
from kvsweep.demo import BUNDLED_MODEL
from kvsweep.demo.reports import generate_reports


@dataclass
class DemoAssetsOptions:
    output_dir: str | None = None  # write the demo's reports and the bundled model here
    train_model: str | None = None  # train the demo model and its tokenizer into this folder instead
    documents: int = 48  # reports of the demo (the bundled tokenizer knows 48)
    train_steps: int = 600
    seed: int = 0


def make_assets(output_dir: str, documents: int, seed: int = 0) -> None:
    """The demo's reports (OUTPUT/govreport.jsonl: lines {"id", "report", "summary"}), and a copy
    of the bundled model beside them (OUTPUT/model, loadable with from_pretrained)."""
    out = Path(output_dir)
    with atomic_folder(out / "model") as staging:
        for item in BUNDLED_MODEL.iterdir():
            (staging / item.name).write_bytes(item.read_bytes())
    with atomic_path(out / "govreport.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in generate_reports(documents, seed)))


def run(options: DemoAssetsOptions) -> None:
    if options.train_model:
        from kvsweep.demo.model import train_model

        train_model(options.train_model, options.train_steps, options.documents, options.seed)
    else:
        make_assets(options.output_dir, options.documents, options.seed)
