"""Summarization (LongBench's GovReport prompt): the report streamed into the evicting cache, then
greedy generation; ROUGE against the reference summaries.

(The engine, the tokenizer's prompt and the statistics are imported where they are used, as in
`kvsweep.tasks.perplexity`.)"""

from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import checked_text
from kvsweep.study import tasks
from kvsweep.tasks import TaskWork, with_costs


def prepare_document(doc, record, text, tokenizer, preparation, stats, index) -> None:
    """The prompt (fitted into max_length, question kept) and the reference summaries."""
    from kvsweep.tasks.prompts import summarization_prompt_ids

    doc["references"] = references_of(record, preparation, index)
    doc["prompt_ids"], truncated = summarization_prompt_ids(tokenizer, text, preparation.max_length)
    stats["prompts_truncated"] = stats.get("prompts_truncated", 0) + truncated


def references_of(record: dict, preparation, index: int) -> list[str]:
    """The record's reference summaries (a text or a list of texts), checked."""
    references = record.get(preparation.summary_field)
    if isinstance(references, str):
        references = [references]
    if (
        not isinstance(references, list)
        or not references
        or not all(isinstance(r, str) and r.strip() for r in references)
    ):
        raise KvsweepError(
            f"{preparation.source}, record {index}: no reference summary in field '{preparation.summary_field}' (a "
            f"text or a list of texts; found {type(references).__name__})"
        )
    for reference in references:
        checked_text(reference, preparation.source, index, preparation.summary_field)
    return references


def report(stats: dict, preparation) -> str:
    return (
        f"prepare: {stats.get('prompts_truncated', 0)} summarization prompt(s) longer than {preparation.max_length} tokens "
        "were truncated in the middle of the report (LongBench's rule)"
    )


def shard_line(doc: dict) -> dict:
    return {"id": doc["id"], "input_ids": doc["prompt_ids"], "references": doc["references"]}


def check_document(doc: dict, max_length: int, path: str) -> None:
    """A prompt is never cut: its end holds the question and the assistant's header."""
    if len(doc["input_ids"]) > max_length:
        raise KvsweepError(
            f"{path}: document '{doc['id']}': the prompt has {len(doc['input_ids'])} tokens, more than --max-length "
            f"{max_length}; cutting it would drop the question at its end (prepare the shard with the same max_length)"
        )


def evaluator(evaluation, model, press, clock=None):
    from kvsweep.engine.generate import stream_generate
    from kvsweep.engine.models import load_tokenizer
    from kvsweep.engine.passes import ReusablePasses

    reuse = ReusablePasses()  # batches of one shape share their passes
    tokenizer = load_tokenizer(evaluation.model_name)
    eos = eos_token_ids(model, tokenizer)

    def summarize_batch(batch):
        stats = {}
        results = stream_generate(
            model,
            [d["input_ids"] for d in batch],
            evaluation.chunk_size,
            evaluation.settings["max_new_tokens"],
            press,
            eos,
            evaluation.cuda_graphs,
            clock=clock,
            reuse=reuse,
            stats=stats,
        )
        return with_costs(result_lines(batch, results, tokenizer), stats)

    return summarize_batch


def result_lines(batch: list[dict], results: list[dict], tokenizer) -> list[dict]:
    """The engine's answers as result lines: the decoded summary beside its references."""
    return [
        {
            "generated": tokenizer.decode(result.pop("generated_ids"), skip_special_tokens=True).strip(),
            "references": doc["references"],
            "n_prompt_tokens": len(doc["input_ids"]),
            **result,
        }
        for doc, result in zip(batch, results, strict=True)
    ]


def eos_token_ids(model, tokenizer) -> set[int]:
    """Where generation stops: the model's end-of-sequence ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | (
        {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    )


def add_rouge(results):
    """Per-document ROUGE of the generated summary against its references."""
    import pandas as pd

    from kvsweep.analysis.rouge import longbench_rouge_l, rouge_score_f1

    scores = [
        {"rougeL": longbench_rouge_l(g, refs), **rouge_score_f1(g, refs)}
        for g, refs in zip(results.generated, results.references, strict=True)
    ]
    return pd.concat([results.reset_index(drop=True), pd.DataFrame(scores)], axis=1)


def summarize(results, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Per configuration: mean ROUGE-L as LongBench computes it, ROUGE-1/2/Lsum from rouge-score,
    the paired ROUGE-L difference to the baseline (bootstrap CI), and the KV densities at the end
    of generation."""
    import pandas as pd

    from kvsweep.analysis.bootstrap import paired_mean_difference
    from kvsweep.analysis.results import configurations, costs, densities, ordered

    results = add_rouge(results)
    rows = []
    for method, value, group, base in configurations(results):
        delta, low, high = paired_mean_difference(
            group.rougeL.to_numpy(), base.rougeL.to_numpy(), n_resamples, confidence, seed
        )
        rows.append({
            "method": method, "swept": group.swept.iloc[0], "value": value,
            **{key: group[key].mean() for key in ("rougeL", "rouge1", "rouge2", "rougeLsum")},
            "delta_rougeL": delta, "delta_rougeL_ci_low": low, "delta_rougeL_ci_high": high,
            **densities(group), **costs(group, base, decoding=True), "n_docs": len(group),
            "mean_generated_tokens": group.n_generated.mean(),
        })  # fmt: skip
    return ordered(pd.DataFrame(rows, columns=list(tasks.SUMMARIZATION.summary_columns)))


def document_losses(rows, base):
    """The baseline's ROUGE-L minus this configuration's, each document weighing the same (the
    baseline's summary of each document is scored once, however many configurations pair with it)."""
    base = base.reset_index()
    once = add_rouge(base.drop_duplicates("id")).set_index("id").rougeL
    return once.loc[base.id].to_numpy() - add_rouge(rows).rougeL.to_numpy(), [1.0] * len(rows)


SUMMARIZATION = TaskWork(
    task=tasks.SUMMARIZATION,
    prepare_document=prepare_document,
    shard_line=shard_line,
    check_document=check_document,
    evaluator=evaluator,
    summarize=summarize,
    document_losses=document_losses,
    report=report,
)
