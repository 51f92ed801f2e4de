"""Streaming (chunked) negative log-likelihood under KV-cache eviction.

Each document x_0..x_{n-1} is fed through the model in chunks of `chunk_size` tokens; every token
enters the cache and tokens 1..n-1 are predicted. Several documents may share a forward pass
(right padding): a document's queries never see the padding (it lies in their future), and its
eviction decisions stop at its own end, so the batch size does not change its result.

The passes run over a preallocated cache (`StaticPasses`); on a GPU each pass shape is captured
once as a CUDA graph and replayed, which is what makes small chunks fast.
"""

import torch
import torch.nn.functional as F

from kvsweep.engine.layout import BatchLayout
from kvsweep.engine.passes import ReusablePasses, cache_slots, open_passes, whole_chunks
from kvsweep.engine.press import StreamingThresholdPress


@torch.inference_mode()
def stream_nll(
    model,
    documents: list[list[int]],
    chunk_size: int,
    press: StreamingThresholdPress | None = None,
    return_evicted: bool = False,
    cuda_graphs: bool | None = None,
    return_decision_scores: bool = False,
    key_bucket: int | None = None,
    clock=None,
    reuse: ReusablePasses | None = None,
    stats: dict | None = None,
) -> list[dict]:
    """Stream one batch of tokenized documents; return per-document NLL sums and KV counts.

    Each result holds `n_tokens`, `nll_sum` (natural log, summed over the n - 1 predicted tokens),
    `n_predicted`, `kv_kept`, `kv_total`, `kv_kept_compressible`, `kv_total_compressible`, and with
    `return_evicted` the final eviction mask `evicted`, a bool array (layers, KV heads, n). With
    `return_decision_scores` (a press made with `record_decisions=True`), `decision_scores`: the
    score of every position of the compressible region [sinks, n - window) when it was decided,
    a float32 array (layers, KV heads, positions).

    `cuda_graphs` (default: on for a CUDA model) replays each pass shape as a CUDA graph;
    `key_bucket` sets the key-length grid of `StaticPasses` (default: `default_bucket`). Neither
    changes the result. `clock` (`kvsweep.core.timing.StageClock`) is billed the graph captures.
    `reuse` (`ReusablePasses`, one per job) reuses the previous batch's passes and graphs when this batch
    has the same shape: same results, fewer captures. `stats` (a dict) gets `kv_cache_bytes`, the
    bytes of the batch's KV cache (the masked engine holds every position).
    """
    device = model.device
    batch = len(documents)
    lengths = torch.tensor([len(doc) for doc in documents], device=device)
    # Whole chunks only, so every pass has the same shape; the slots past a document are padding.
    width = whole_chunks(max(len(doc) for doc in documents), chunk_size)
    input_ids = right_padded_ids(documents, width + 1, device)

    nll = torch.zeros(batch, dtype=torch.float64, device=device)
    layout = BatchLayout.right_padded(documents, cache_slots(width, chunk_size, key_bucket), device)
    press = streaming_press(press, reuse)
    with press(model):
        passes = open_passes(model, layout, press, chunk_size, key_bucket, cuda_graphs, clock, reuse)
        for start, end, positions, logits in passes.stream(input_ids, lengths, width, chunk_size):
            # Position p predicts token p + 1, for p + 1 < n.
            targets = input_ids[:, start + 1 : end + 1]
            predicts = (positions[None, :] + 1) < lengths[:, None]
            # Classes on the last axis: cross_entropy over (batch, vocab, chunk) would put the softmax on
            # a strided axis, which PyTorch's CUDA kernel walks serially (measured 80 ms a pass on H100).
            # A split model's logits are on its last GPU: the targets go there, not the logits here.
            targets = targets.flatten().to(logits.device)
            token_nll = F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="none").to(device)
            nll += (token_nll.view(predicts.shape) * predicts).sum(1, dtype=torch.float64)

        counts = press.kv_counts_per_document()
        if stats is not None:
            stats["kv_cache_bytes"] = passes.kv_bytes()
        if return_evicted:
            evicted = torch.stack([press.layers[i].evicted.cpu() for i in sorted(press.layers)]).numpy()
        if return_decision_scores:
            decisions = torch.stack([press.layers[i].decision_scores.cpu() for i in sorted(press.layers)]).numpy()

    results = [
        {
            "n_tokens": len(doc),
            "nll_sum": float(nll[row]),
            "n_predicted": len(doc) - 1,
            **counts[row],
        }
        for row, doc in enumerate(documents)
    ]
    if return_evicted:
        for row, (doc, result) in enumerate(zip(documents, results, strict=True)):
            result["evicted"] = evicted[:, row, :, : len(doc)]
    if return_decision_scores:
        for row, (doc, result) in enumerate(zip(documents, results, strict=True)):
            result["decision_scores"] = decisions[:, row, :, press.sinks : max(len(doc) - press.sliding_window_size, 0)]
    return results


def right_padded_ids(documents: list[list[int]], width: int, device) -> torch.Tensor:
    """(batch, width) token ids, each document from slot 0, padded with 0 on the right."""
    input_ids = torch.zeros((len(documents), width), dtype=torch.long, device=device)
    for row, doc in enumerate(documents):
        input_ids[row, : len(doc)] = torch.tensor(doc, device=device)
    return input_ids


def streaming_press(press: StreamingThresholdPress | None, reuse: ReusablePasses | None) -> StreamingThresholdPress:
    """The press a stream runs: the one given, or the baseline's. A fixed ratio is refused: it is
    kvpress's budget over a whole context, decided once (`compress_once`), which a stream never holds."""
    if press is not None and press.fixed_ratio is not None:
        raise ValueError(
            "a fixed ratio (kvpress's compression_ratio) compresses a whole context once: use compress_once"
        )
    return press if press is not None else mask_only_press(reuse)


def mask_only_press(reuse: ReusablePasses | None) -> StreamingThresholdPress:
    """The baseline's press (masking only): one per job when passes are reused, so they can be."""
    if reuse is None:
        return StreamingThresholdPress.mask_only()
    if reuse.mask_only_press is None:
        reuse.mask_only_press = StreamingThresholdPress.mask_only()
    return reuse.mask_only_press
