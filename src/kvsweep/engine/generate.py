"""Greedy generation after a streamed prompt, with eviction continuing while decoding.

The prompt (e.g. a GovReport report in LongBench's summarization prompt) streams into the cache in
chunks exactly as in `stream_nll`; then each new token is one pass of one query per document,
and the press keeps deciding (the decoding-time behaviour of `DMSPress(decoding=True)`). Documents
share cache slots: all prompts start at slot 0 (padding on the right), so every document is
chunked as it would be alone, and every document's new token goes to the same slot, with its own
position id; a shorter prompt thus leaves padding slots, which the masked attention hides. A
document that has produced an end-of-sequence token stops: its later slots are padding and its
cache is no longer decided on, so the batch never changes a document's output.
"""

import time

import torch

from kvsweep.engine.layout import BatchLayout
from kvsweep.engine.passes import open_passes, whole_chunks
from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.stream_nll import right_padded_ids, streaming_press


@torch.inference_mode()
def stream_generate(
    model,
    prompts: list[list[int]],
    chunk_size: int,
    max_new_tokens: int,
    press: StreamingThresholdPress | None = None,
    eos_token_ids: set[int] | None = None,
    cuda_graphs: bool | None = None,
    key_bucket: int | None = None,
    clock=None,
    reuse=None,
    stats: dict | None = None,
) -> list[dict]:
    """Return per prompt: `generated_ids` (without the end-of-sequence token), `n_generated`, and
    the KV counts at the end of generation (`kv_kept`, `kv_total`, and the compressible ones).
    `cuda_graphs`, `key_bucket`, `clock` and `reuse` as in `stream_nll`: speed only. `stats` (a
    dict) gets the batch's `kv_cache_bytes` and its decoding's `decode_seconds` and `decode_tokens`
    (`DecodeTiming`)."""
    device = model.device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = whole_chunks(max(len(p) for p in prompts), chunk_size)  # whole chunks: one pass shape
    capacity = width + max_new_tokens
    input_ids = right_padded_ids(prompts, width, device)

    # The baseline needs the masked attention too, to hide the padding between prompt and answer.
    press = streaming_press(press, reuse)
    layout = BatchLayout.right_padded(prompts, capacity, device)
    layout.max_gap = width - int(min(len(p) for p in prompts))
    rows = torch.arange(batch, device=device)
    next_logits = torch.zeros((batch, model.config.get_text_config().vocab_size), device=device)
    answers = GreedyAnswers(batch, max_new_tokens, eos_token_ids, device)
    timing = DecodeTiming(device)

    with press(model):
        passes = open_passes(model, layout, press, chunk_size, key_bucket, cuda_graphs, clock, reuse)
        layout = passes.layout  # with `reuse`, the reused layout now holds this batch
        for start, end, _, logits in passes.stream(input_ids, lengths, width, chunk_size):
            # Keep the logits at each prompt's last token, wherever its chunk is.
            last = lengths - 1
            here = (last >= start) & (last < end)
            # (a split model's logits are on its last GPU)
            where = (last - start).clamp(0, end - start - 1).to(logits.device)
            picked = logits[rows.to(logits.device), where].float().to(device)
            next_logits = torch.where(here[:, None], picked, next_logits)

        for step in range(max_new_tokens):
            token, writing, done = answers.take(next_logits, step)
            if done:
                break
            # The token goes into the cache at slot width + step, document position n + step.
            slot = width + step
            count = lengths + answers.n_generated
            layout.position[:, slot] = torch.where(writing, count - 1, -1)
            layout.read(torch.where(writing, count - 1, count), count)
            next_logits = passes.run(token[:, None], (count - 1)[:, None], slot)[:, 0].float().to(device)
            if step == 0:
                timing.first_step_done(answers)

        counts = press.kv_counts_per_document()
        timing.into(stats, answers, passes)

    return [{**answer, **counts[row]} for row, answer in enumerate(answers.results())]


class DecodeTiming:
    """The wall seconds of a batch's decoding steps after the first (whose pass may capture its
    CUDA graph) and the tokens those steps wrote, for `stats` (`decode_seconds`, `decode_tokens`,
    with the bytes of the cache decoded over, `kv_cache_bytes`). Two host syncs a batch, at the
    first step's end and at the last's."""

    def __init__(self, device):
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.start, self.first_written = None, 0

    def first_step_done(self, answers: "GreedyAnswers") -> None:
        self.synchronize()
        self.start, self.first_written = time.perf_counter(), int(answers.n_generated.sum())

    def into(self, stats: dict | None, answers: "GreedyAnswers", passes) -> None:
        if stats is None:
            return
        self.synchronize()
        seconds = time.perf_counter() - self.start if self.start is not None else 0.0
        stats.update(decode_seconds=seconds, decode_tokens=int(answers.n_generated.sum()) - self.first_written,
                     kv_cache_bytes=passes.kv_bytes())  # fmt: skip


class GreedyAnswers:
    """The tokens a batch writes greedily, step by step: a document stops at its first
    end-of-sequence token (not kept) and writes nothing after it. With `keep_first`, the first
    token is kept whatever it is and the end is looked for from the second on, as kvpress's
    pipeline does (`KVPressTextGenerationPipeline.generate_answer`)."""

    def __init__(self, batch: int, max_new_tokens: int, eos_token_ids: set[int] | None, device, keep_first=False):
        self.max_new_tokens, self.keep_first = max_new_tokens, keep_first
        self.eos = torch.tensor(sorted(eos_token_ids or []), dtype=torch.long, device=device)
        self.generated = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.n_generated = torch.zeros(batch, dtype=torch.long, device=device)

    def take(self, next_logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Step `step`'s token of each document (the argmax of `next_logits`), which documents
        write it, and whether generation is over (the last step, or every document has ended)."""
        token = next_logits.argmax(-1)
        looks = len(self.eos) and not (self.keep_first and step == 0)
        stops = torch.isin(token, self.eos) if looks else torch.zeros_like(self.finished)
        writing = ~self.finished & ~stops
        self.generated[:, step] = torch.where(writing, token, 0)
        self.n_generated += writing
        self.finished |= stops
        # Every document's end is checked every 16 steps only: each check waits for the GPU.
        done = step == self.max_new_tokens - 1 or (step % 16 == 15 and bool(self.finished.all()))
        return token, writing, done

    def results(self) -> list[dict]:
        """Per document: `generated_ids` and `n_generated`."""
        generated, n_generated = self.generated.tolist(), self.n_generated.tolist()
        return [{"generated_ids": ids[:n], "n_generated": n} for ids, n in zip(generated, n_generated, strict=True)]
