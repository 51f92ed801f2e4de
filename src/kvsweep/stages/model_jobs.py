"""What every job that runs the model shares (evaluate, the calibration's probe and search, the
eviction map): its options, checked; its shard, read and checked; the model, loaded; the method's
press, built. The heavy imports (torch, transformers, kvpress) happen only once the input is known
to be good, each billed to its stage of the job's clock (`kvsweep.core.timing`)."""

from dataclasses import dataclass, field

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import read_jsonl
from kvsweep.core.job import job_gpus
from kvsweep.core.timing import StageClock
from kvsweep.study.methods import Method, get_method


@dataclass
class EngineOptions:
    """The model, the data and the method of a job that runs the model."""

    model: str  # hub id or local folder of a causal LM
    data: str  # a shard: JSONL of {id, input_ids, ...}
    method: str  # a method of kvsweep.study.methods
    chunk_size: int
    max_length: int  # documents are truncated to this many tokens
    threshold: float | None = None  # not for baseline or streaming_llm (which sweeps its window)
    settings: dict = field(default_factory=dict)  # the method's settings given; the rest are its defaults
    batch_size: int = 1
    device: str = "cpu"
    gpus: int | None = None  # GPUs to split the model over (None: the workflow's variable, else 1)
    dtype: str = "float32"
    cuda_graphs: str = "auto"  # auto: on a GPU, replay each pass shape as a CUDA graph; off: eagerly

    def __post_init__(self):
        # No document holds more than max_length tokens, so a larger chunk computes what a chunk of
        # max_length computes; the passes' buffers are sized by the chunk (a chunk of 1e9 asked for
        # 128 GB).
        if self.max_length >= 1 and self.chunk_size > self.max_length:
            self.chunk_size = self.max_length

    @property
    def graphs(self) -> bool | None:
        """For `stream_nll` / `stream_generate`: None (graphs on a GPU) or False (off)."""
        return None if self.cuda_graphs == "auto" else False

    @property
    def gpu_count(self) -> int:
        """The GPUs this job computes on (0 on the CPU): those its model is split over."""
        return job_gpus(self.device, self.gpus)


def resolve_method(options: EngineOptions, compression_ratio: bool = False) -> tuple[Method, dict]:
    """Check the numeric options and the method's settings and threshold; return (method, settings).
    A method whose score exists in kvpress's protocol only runs at a compression ratio only."""
    for name in ("chunk_size", "max_length", "batch_size"):
        if getattr(options, name) < 1:
            raise KvsweepError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    if options.max_length < 2:
        raise KvsweepError("--max-length must be at least 2")
    method = get_method(options.method)
    if method.ratio_only and not compression_ratio:
        raise KvsweepError(
            f"method '{method.name}' runs at a compression ratio only (`kvsweep evaluate --compression-ratio` on a task "
            "in kvpress's protocol): its score exists within the context's one pass"
        )
    settings = method.resolve(options.threshold, {k: v for k, v in options.settings.items() if v is not None})
    if method.takes_threshold:
        try:
            method.check_threshold(options.threshold)
        except KvsweepError as err:
            raise KvsweepError(f"--threshold: {err}") from None
    return method, settings


def load_shard(path: str, max_length: int, task: str = "perplexity") -> list[dict]:
    """A shard's documents, checked. A document longer than `max_length` is cut (perplexity: the
    end of a report is dropped) unless its task refuses it (a summarization prompt: its end holds
    the question, so prepare fits it into max_length)."""
    from kvsweep.tasks import work_of

    work = work_of(task)
    documents = read_jsonl(path, required=work.task.shard_fields)
    seen = set()
    for doc in documents:
        doc_id, ids = str(doc["id"]), doc["input_ids"]
        if doc_id in seen:
            raise KvsweepError(f"{path}: document id '{doc_id}' appears twice")
        seen.add(doc_id)
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise KvsweepError(f"{path}: document '{doc_id}': input_ids must be a list of token ids (integers >= 0)")
        if len(ids) < 2:
            raise KvsweepError(f"{path}: document '{doc_id}' has {len(ids)} token(s); at least 2 are needed")
        doc["id"] = doc_id
        work.check_document(doc, max_length, path)
        doc["input_ids"] = ids[:max_length]
    return documents


def check_vocabulary(documents: list[dict], vocabulary: int, path: str) -> None:
    """Token ids beyond the model's embedding: the shard was made with another tokenizer."""
    for doc in documents:
        largest = max(doc["input_ids"])
        if largest >= vocabulary:
            raise KvsweepError(
                f"{path}: document '{doc['id']}' holds token id {largest}, outside the model's vocabulary of "
                f"{vocabulary}: the shard was prepared with another model's tokenizer"
            )


def load_engine_model(options: EngineOptions, clock: StageClock):
    """The heavy imports (torch, transformers, and kvpress: the engine's press, which every method,
    the baseline included, runs through), then the model on `options.device`, each billed to its
    stage; from then on, stage boundaries wait for the device."""
    with clock.stage("imports"):
        import kvsweep.engine.methods  # noqa: F401
        from kvsweep.engine.models import load_model, on_device
    if options.device != "cpu":
        clock.synchronize = on_device(options.device, options.gpu_count)
    with clock.stage("model_load"):
        return load_model(options.model, options.dtype, options.device, gpus=options.gpu_count)


def build_press(
    method: Method,
    threshold: float | None,
    settings: dict,
    model,
    clock: StageClock,
    compression_ratio: float | None = None,
    adaptive_safeguard: float | None = None,
):
    """The method's press (None for the baseline) with what it loads (KVzap's surrogate), billed to
    `surrogate_load`; with `compression_ratio`, kvpress's fixed budget instead of the threshold."""
    from kvsweep.engine.methods import build_press as build

    with clock.stage("surrogate_load"):
        press = build(method, threshold, settings, compression_ratio, adaptive_safeguard)
        if press is not None:
            press.post_init_from_model(model)
    return press
