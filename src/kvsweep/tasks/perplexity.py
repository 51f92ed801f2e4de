"""Streaming perplexity: the document's next-token NLL while it streams through the evicting cache.

(The engine and the statistics are imported where they are used: a job checks its shard before
it pays for torch, and the time of the imports is billed to their stage.)"""

import math

from kvsweep.study import tasks
from kvsweep.tasks import TaskWork, with_costs


def prepare_document(doc, record, text, tokenizer, preparation, stats, index) -> None:
    """Nothing beyond the report's tokens (doc["input_ids"], cut to max_length)."""


def shard_line(doc: dict) -> dict:
    return {"id": doc["id"], "input_ids": doc["input_ids"]}


def check_document(doc: dict, max_length: int, path: str) -> None:
    """Any length: a report longer than max_length loses its end."""


def evaluator(evaluation, model, press, clock=None):
    from kvsweep.engine.passes import ReusablePasses
    from kvsweep.engine.stream_nll import stream_nll

    reuse = ReusablePasses()  # batches of one shape share their passes

    def score_batch(batch):
        stats = {}
        results = stream_nll(
            model, [d["input_ids"] for d in batch], evaluation.chunk_size, press, cuda_graphs=evaluation.cuda_graphs,
            clock=clock, reuse=reuse, stats=stats,
        )  # fmt: skip
        return with_costs(results, stats)

    return score_batch


def summarize(results, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Per configuration: perplexity, mean NLL and the paired NLL difference to the baseline per
    predicted token (bootstrap CI over documents), and the KV densities."""
    import pandas as pd

    from kvsweep.analysis.bootstrap import paired_delta
    from kvsweep.analysis.results import configurations, costs, densities, ordered

    rows = []
    for method, value, group, base in configurations(results):
        delta, low, high = paired_delta(group.nll_sum.to_numpy(), base.nll_sum.to_numpy(),
                                        group.n_predicted.to_numpy(), n_resamples, confidence, seed)  # fmt: skip
        nll = group.nll_sum.sum() / group.n_predicted.sum()
        rows.append({
            "method": method, "swept": group.swept.iloc[0], "value": value, "ppl": math.exp(nll), "nll": nll,
            "delta_nll": delta, "delta_nll_ci_low": low, "delta_nll_ci_high": high,
            **densities(group), **costs(group, base), "n_docs": len(group), "n_tokens": int(group.n_predicted.sum()),
        })  # fmt: skip
    return ordered(pd.DataFrame(rows, columns=list(tasks.PERPLEXITY.summary_columns)))


def document_losses(rows, base):
    """NLL sum minus the baseline's, weighted by predicted tokens (so: nats per token)."""
    return rows.nll_sum.to_numpy() - base.nll_sum.to_numpy(), rows.n_predicted.astype(float).to_numpy()


PERPLEXITY = TaskWork(
    task=tasks.PERPLEXITY,
    prepare_document=prepare_document,
    shard_line=shard_line,
    check_document=check_document,
    evaluator=evaluator,
    summarize=summarize,
    document_losses=document_losses,
)
