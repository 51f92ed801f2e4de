"""Streaming perplexity: the document's next-token NLL while it streams through the evicting cache."""

from kvsweep.tasks import KV_FIELDS, Task

COLUMNS = ("method", "swept", "value", "target_density", "ppl", "nll", "delta_nll", "delta_nll_ci_low",
           "delta_nll_ci_high", "kv_density", "kv_density_compressible", "n_docs", "n_tokens")  # fmt: skip


def prepare_document(doc, record, text, tokenizer, args, stats, index) -> None:
    """Nothing beyond the report's tokens (doc["input_ids"], cut to max_length)."""


def shard_line(doc: dict) -> dict:
    return {"id": doc["id"], "input_ids": doc["input_ids"]}


def check_document(doc: dict, max_length: int, path: str) -> None:
    """Any length: a report longer than max_length loses its end."""


def evaluator(args, model, press, clock=None):
    from kvsweep.evaluate import cuda_graphs_setting
    from kvsweep.static_passes import KeptPasses
    from kvsweep.stream_nll import stream_nll

    graphs, kept = cuda_graphs_setting(args), KeptPasses()  # batches of one shape share their passes
    return lambda batch: stream_nll(
        model, [d["input_ids"] for d in batch], args.chunk_size, press, cuda_graphs=graphs, clock=clock, kept=kept
    )


def summarize(results, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Per configuration: perplexity, mean NLL and the paired NLL difference to the baseline per
    predicted token (bootstrap CI over documents), and the KV densities."""
    import math

    import pandas as pd

    from kvsweep.score import configurations, densities, ordered, paired_delta

    rows = []
    for method, value, group, base in configurations(results):
        delta, low, high = paired_delta(group.nll_sum.to_numpy(), base.nll_sum.to_numpy(),
                                        group.n_predicted.to_numpy(), n_resamples, confidence, seed)  # fmt: skip
        nll = group.nll_sum.sum() / group.n_predicted.sum()
        rows.append({
            "method": method, "swept": group.swept.iloc[0], "value": value, "ppl": math.exp(nll), "nll": nll,
            "delta_nll": delta, "delta_nll_ci_low": low, "delta_nll_ci_high": high,
            **densities(group), "n_docs": len(group), "n_tokens": int(group.n_predicted.sum()),
        })  # fmt: skip
    return ordered(pd.DataFrame(rows, columns=list(COLUMNS)))


def document_losses(rows, base):
    """NLL sum minus the baseline's, weighted by predicted tokens (so: nats per token)."""
    return rows.nll_sum.to_numpy() - base.nll_sum.to_numpy(), rows.n_predicted.astype(float).to_numpy()


PERPLEXITY = Task(
    name="perplexity",
    description="next-token NLL of the report streamed through the evicting cache",
    shard_fields=("id", "input_ids"),
    result_fields=frozenset({"id", "n_tokens", "nll_sum", "n_predicted"}) | KV_FIELDS,
    length_field="n_tokens",
    difference="delta_nll",
    difference_label="ΔNLL vs baseline (nats/token)",
    quality="ppl",
    quality_label="perplexity",
    loss_unit="nats per token",
    prepare_document=prepare_document,
    shard_line=shard_line,
    check_document=check_document,
    evaluator=evaluator,
    summarize=summarize,
    document_losses=document_losses,
    summary_columns=COLUMNS,
)
