"""Perplexity in kvpress's protocol: each report but its last `continuation_tokens` tokens is
prefilled whole and compressed once, then the NLL of those last tokens is measured in one pass
with nothing more evicted (`kvsweep.engine.compress_once.compress_once_nll`). The shards are
perplexity's; the split is made when the job runs, from the task's setting."""

from kvsweep.core.errors import KvsweepError
from kvsweep.study import tasks
from kvsweep.tasks import TaskWork, perplexity, with_costs


def evaluator(evaluation, model, press, clock=None):
    from kvsweep.engine.compress_once import compress_once_nll

    keep = evaluation.settings["continuation_tokens"]

    def score_batch(batch):
        for doc in batch:
            if len(doc["input_ids"]) <= keep:
                raise KvsweepError(
                    f"document '{doc['id']}' has {len(doc['input_ids'])} tokens: perplexity_kvpress scores its last "
                    f"{keep} (perplexity_kvpress.continuation_tokens) after the rest, so every document needs more; "
                    "raise dataset.min_length above continuation_tokens"
                )
        stats = {}
        results = compress_once_nll(
            model, [d["input_ids"][:-keep] for d in batch], [d["input_ids"][-keep:] for d in batch], press,
            cuda_graphs=evaluation.cuda_graphs, clock=clock, prefill_batch=evaluation.prefill_batch, stats=stats,
        )  # fmt: skip
        return with_costs(results, stats)

    return score_batch


PERPLEXITY_KVPRESS = TaskWork(
    task=tasks.PERPLEXITY_KVPRESS,
    prepare_document=perplexity.prepare_document,
    shard_line=perplexity.shard_line,
    check_document=perplexity.check_document,
    evaluator=evaluator,
    summarize=perplexity.summarize,
    document_losses=perplexity.document_losses,
)
