"""Summarization in kvpress's protocol: the GovReport prompt split where the report ends, the
context (instructions and report) prefilled whole and compressed once, then the question and
greedy generation (`kvsweep.engine.compress_once`); ROUGE as for streaming summarization.

A shard line records the `context` and `question` strings and their token ids as kvpress's
pipeline makes them (`input_ids`: context then question; `context_length`: the context's), so
`pipeline("kv-press-text-generation")(context, question=question, press=...)` can be run on
exactly the same input."""

from kvsweep.core.errors import KvsweepError
from kvsweep.study import tasks
from kvsweep.tasks import TaskWork, summarization, with_costs


def prepare_document(doc, record, text, tokenizer, preparation, stats, index) -> None:
    """Context and question (fitted into max_length, question kept), their ids, the references."""
    from kvsweep.tasks.prompts import kvpress_summarization_inputs

    doc["references"] = summarization.references_of(record, preparation, index)
    context, question, context_ids, question_ids, truncated = kvpress_summarization_inputs(
        tokenizer, text, preparation.max_length
    )
    doc.update(context=context, question=question, kvpress_ids=context_ids + question_ids,
               context_length=len(context_ids))  # fmt: skip
    stats["prompts_truncated"] = stats.get("prompts_truncated", 0) + truncated


def shard_line(doc: dict) -> dict:
    return {"id": doc["id"], "input_ids": doc["kvpress_ids"], "context_length": doc["context_length"],
            "context": doc["context"], "question": doc["question"], "references": doc["references"]}  # fmt: skip


def check_document(doc: dict, max_length: int, path: str) -> None:
    """The prompt is never cut (its end is the question), and context and question each hold a token."""
    summarization.check_document(doc, max_length, path)
    n_context = doc["context_length"]
    if not isinstance(n_context, int) or isinstance(n_context, bool) or not 1 <= n_context < len(doc["input_ids"]):
        raise KvsweepError(
            f"{path}: document '{doc['id']}': context_length must be a whole number from 1 to "
            f"{len(doc['input_ids']) - 1} (the question follows the context in input_ids), got {n_context!r}"
        )


def evaluator(evaluation, model, press, clock=None):
    from kvsweep.engine.compress_once import compress_once_generate
    from kvsweep.engine.models import load_tokenizer

    tokenizer = load_tokenizer(evaluation.model_name)
    # Where kvpress's pipeline stops: the model's generation config only (not the tokenizer's).
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def summarize_batch(batch):
        stats = {}
        results = compress_once_generate(
            model,
            [d["input_ids"][: d["context_length"]] for d in batch],
            [d["input_ids"][d["context_length"] :] for d in batch],
            evaluation.settings["max_new_tokens"],
            press,
            decoding=evaluation.settings["decoding"],
            eos_token_ids=eos,
            cuda_graphs=evaluation.cuda_graphs,
            clock=clock,
            prefill_batch=evaluation.prefill_batch,
            stats=stats,
        )
        return with_costs(summarization.result_lines(batch, results, tokenizer), stats)

    return summarize_batch


SUMMARIZATION_KVPRESS = TaskWork(
    task=tasks.SUMMARIZATION_KVPRESS,
    prepare_document=prepare_document,
    shard_line=shard_line,
    check_document=check_document,
    evaluator=evaluator,
    summarize=summarization.summarize,
    document_losses=summarization.document_losses,
    report=summarization.report,
)
