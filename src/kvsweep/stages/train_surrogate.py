"""Train a KVzap surrogate for any model: KVzip+ targets on training documents, a linear or MLP
surrogate fitted to them, and how well it predicts them on held-out documents.

The data holds prepared documents ({"id", "input_ids"}, as `kvsweep.stages.prepare` writes them); the
last `validation_documents` of them are held out. Each document is read inside KVzip's repeat
prompt (`kvsweep.surrogate.kvzip_targets`), and `tokens_per_document` of its positions (drawn at random,
seeded) give one (features, targets) pair per layer. `exclude` names document lists
(documents.jsonl) whose ids must not be among the training or held-out documents: the study's and
the calibration's.

The output folder is written at the end, atomically: the surrogate as `KVzapModel.save_pretrained` writes it
(what kvpress's `KVzapModel.from_pretrained` and kvsweep's `kvzap_surrogate` load) and
`validation.json`: per layer, R^2 and Spearman rank correlation on the held-out documents, for the
trained surrogate and, as the floor, an untrained one of the same shape. Its `.stages.json` says
where the job's time went (`kvsweep.core.timing`). `check_documents` is the workflow's separate check of the same disjointness on the document lists (a job nothing
waits for, so that rewriting the study's lists never retrains the surrogate).
"""

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import atomic_folder, atomic_path, read_jsonl, write_json_atomic
from kvsweep.core.job import job_gpus
from kvsweep.core.timing import StageClock, discard_stage_record


@dataclass
class TrainSurrogateOptions:
    model: str  # hub id or local folder of the causal LM
    data: str  # prepared documents: JSONL of {id, input_ids}
    output: str  # folder of the trained surrogate
    validation_documents: int  # the last N documents are held out
    dtype: str = "float32"
    device: str = "cpu"
    gpus: int | None = None
    tokens_per_document: int = 512  # positions drawn per document
    kvzap_type: str = "mlp"
    hidden_dim: int = 512  # the MLP's hidden width
    epochs: int = 15
    learning_rate: float = 5e-3
    batch_size: int = 512
    seed: int = 0
    exclude: list[str] = field(default_factory=list)  # document lists whose ids must not be used


def split_documents(options: TrainSurrogateOptions) -> tuple[list[dict], list[dict]]:
    """(training, held-out) documents, checked: enough of them, none in an excluded list."""
    for name in ("validation_documents", "tokens_per_document", "hidden_dim", "epochs", "batch_size"):
        if getattr(options, name) < 1:
            raise KvsweepError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    documents = list(read_jsonl(options.data))
    if len(documents) <= options.validation_documents:
        raise KvsweepError(
            f"{options.data}: {len(documents)} documents, but {options.validation_documents} are held out for validation: "
            "none would be left to train on (surrogate.documents)"
        )
    check_disjoint([doc["id"] for doc in documents], options.exclude)
    return documents[: -options.validation_documents], documents[-options.validation_documents :]


def check_disjoint(ids: list[str], exclude: list[str]) -> int:
    """Raise if any of `ids` is listed in one of the `exclude` document lists; the number of
    documents listed there otherwise."""
    excluded = {entry["id"] for path in exclude for entry in read_jsonl(path)}
    if shared := sorted(set(ids) & excluded):
        raise KvsweepError(
            f"{len(shared)} surrogate document(s) are also evaluated or calibrated on (e.g. '{shared[0]}'): "
            "the surrogate must not learn the documents it is judged on"
        )
    return len(excluded)


def check_documents(documents: str, exclude: list[str], output: str) -> None:
    """The workflow's check that the surrogate's documents (their list, `documents`) are none of
    the study's or the calibration's (`exclude`), written to `output` as one line."""
    ids = [entry["id"] for entry in read_jsonl(documents)]
    others = check_disjoint(ids, exclude)
    line = f"{len(ids)} surrogate documents, none among the {others} documents evaluated or calibrated on\n"
    with atomic_path(output) as tmp:
        tmp.write_text(line)
    print(line, end="", file=sys.stderr)


def collect(collector, tokenizer, documents: list[dict], per_document: int, seed: int, desc: str):
    """Features (N, layers, hidden) on the host in the model's dtype, targets (N, layers, KV heads)
    in float32, from `per_document` random positions of each document, and how many targets were
    log(0) (attention that underflowed, or a key outside a sliding window): those are set to the
    smallest finite target of their document and layer, not dropped, since dropping would remove
    exactly the unimportant positions the surrogate must learn to rank low."""
    import torch
    from tqdm import tqdm

    from kvsweep.surrogate.kvzip_targets import repeat_prompt

    # Without the prepared BOS: the repeat prompt places its own special tokens.
    bodies = [
        doc["input_ids"][1:] if doc["input_ids"][:1] == [tokenizer.bos_token_id] else doc["input_ids"]
        for doc in documents
    ]
    for doc, ids in zip(documents, bodies, strict=True):
        if len(ids) < 2:
            raise KvsweepError(f"document '{doc['id']}' has fewer than 2 tokens")
    total = sum(min(len(ids), per_document) for ids in bodies)
    generator = torch.Generator().manual_seed(seed)
    features = targets = None  # allocated once the first document gives the shapes (no copy at the end)
    filled = clamped = 0
    for ids in tqdm(bodies, desc=desc, unit="doc", file=sys.stderr):
        x, y = collector.collect(repeat_prompt(tokenizer, ids))
        keep = torch.randperm(len(ids), generator=generator)[:per_document].sort().values.to(x.device)
        x, y = x[keep].cpu(), y[keep].cpu()
        finite = torch.isfinite(y)
        if not finite.all():
            clamped += int((~finite).sum())
            floor = torch.where(finite, y, torch.inf).amin(dim=(0, 2), keepdim=True)  # per layer
            if not torch.isfinite(floor).all():
                raise KvsweepError("every target of a layer is log(0): the model attends to no document position")
            y = torch.where(finite, y, floor.expand_as(y))
        if features is None:
            features = torch.empty((total, *x.shape[1:]), dtype=x.dtype)
            targets = torch.empty((total, *y.shape[1:]), dtype=torch.float32)
        features[filled : filled + len(x)], targets[filled : filled + len(x)] = x, y
        filled += len(x)
    return features, targets, clamped


def run(options: TrainSurrogateOptions, clock: StageClock | None = None) -> dict:
    clock = clock or StageClock()
    output = Path(options.output)
    discard_stage_record(output)
    train_docs, held_out = split_documents(options)
    with clock.stage("imports"):
        import torch

        from kvsweep.engine.models import load_model, load_tokenizer, on_device
        from kvsweep.surrogate.fit import agreement, fit_linear, fit_mlp, new_surrogate, predict
        from kvsweep.surrogate.kvzip_targets import KVzipTargetCollector
    gpus = job_gpus(options.device, options.gpus)
    if options.device != "cpu":
        clock.synchronize = on_device(options.device, gpus)
    with clock.stage("model_load"):
        tokenizer = load_tokenizer(options.model)
        model = load_model(options.model, options.dtype, options.device, attention="eager", gpus=gpus)
    with clock.stage("model_work"):
        started = time.time()
        collector = KVzipTargetCollector(model)
        x_train, y_train, clamped = collect(
            collector, tokenizer, train_docs, options.tokens_per_document, options.seed, "targets"
        )
        x_val, y_val, clamped_val = collect(
            collector, tokenizer, held_out, options.tokens_per_document, options.seed + 1, "held out"
        )
        del model, collector
        if options.device != "cpu":
            gc.collect()  # (a model split over GPUs is in a reference cycle: accelerate's hooks)
            torch.cuda.empty_cache()
        collect_s, started = time.time() - started, time.time()
        if options.kvzap_type == "linear":
            surrogate = fit_linear(x_train, y_train, options.device)
        else:
            fit = {"epochs": options.epochs, "learning_rate": options.learning_rate, "batch_size": options.batch_size}
            surrogate = fit_mlp(x_train, y_train, options.device, options.hidden_dim, seed=options.seed, **fit)
        hidden_dim = None if options.kvzap_type == "linear" else options.hidden_dim
        fit_s = time.time() - started
        untrained = new_surrogate(x_train, y_train, hidden_dim, options.seed + 2)
        trained_rows = agreement(predict(surrogate, x_val, options.device), y_val)
        floor_rows = agreement(predict(untrained, x_val, options.device), y_val)
    layers = [
        {**row, "untrained_r2": floor["r2"], "untrained_spearman": floor["spearman"]}
        for row, floor in zip(trained_rows, floor_rows, strict=True)
    ]
    record = {
        "model": options.model,
        "kvzap_type": options.kvzap_type,
        "training_documents": [doc["id"] for doc in train_docs],
        "held_out_documents": [doc["id"] for doc in held_out],
        "training_positions": int(x_train.shape[0]),
        "held_out_positions": int(x_val.shape[0]),
        "training_tokens": sum(len(doc["input_ids"]) for doc in train_docs),
        # Targets that were log(0), set to their layer's smallest (train_surrogate.collect).
        "clamped_target_share": (clamped + clamped_val) / (y_train.numel() + y_val.numel()),
        "mean_r2": sum(r["r2"] for r in layers) / len(layers),
        "mean_spearman": sum(r["spearman"] for r in layers) / len(layers),
        "untrained_mean_spearman": sum(r["untrained_spearman"] for r in layers) / len(layers),
        "layers": layers,
    }
    with clock.stage("writing"), atomic_folder(output) as staging:
        surrogate.save_pretrained(staging)
        write_json_atomic(staging / "validation.json", record)
    print(
        f"train_surrogate: {options.kvzap_type} surrogate on {len(train_docs)} documents ({record['training_positions']} "
        f"positions); held out ({len(held_out)} documents): mean R^2 {record['mean_r2']:.3f}, mean Spearman "
        f"{record['mean_spearman']:.3f} (untrained: {record['untrained_mean_spearman']:.3f})",
        file=sys.stderr,
    )
    # Target collection (the model's forward passes) and the fit, apart: what a surrogate costs.
    if options.device != "cpu":
        # The most any of the job's GPUs held (a split model's first GPU also holds the fit).
        record["peak_gpu_memory_gib"] = max(torch.cuda.max_memory_allocated(i) for i in range(gpus)) / 2**30
    clock.save(output, peak_gpu_memory_gib=record.get("peak_gpu_memory_gib"), gpus=gpus, documents=len(train_docs) + len(held_out),
               collect_s=collect_s, fit_s=fit_s,
               tokens_read=sum(len(doc["input_ids"]) for doc in train_docs + held_out))  # fmt: skip
    return record
