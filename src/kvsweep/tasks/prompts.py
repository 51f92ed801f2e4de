"""LongBench's GovReport summarization prompt (Bai et al., 2023, https://arxiv.org/abs/2308.14508)."""

from kvsweep.core.errors import KvsweepError

GOV_REPORT_PROMPT = (
    "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
    "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
)

# Decode / re-encode can shift a cut prompt by a token or so; a few rounds settle it.
_MAX_ROUNDS = 16


def model_input_ids(tokenizer, prompt: str) -> list[int]:
    """What the model reads for `prompt`: the chat template with the assistant's header when the
    tokenizer has one, else the prompt with the tokenizer's special tokens (BOS)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def summarization_prompt_ids(tokenizer, report: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of the prompt for `report`, at most `max_length` of them, and whether the report
    was cut.

    LongBench's rule: a prompt that is too long keeps its first and last halves of tokens (the cut
    falls inside the report; the instructions and the question survive). LongBench cuts the bare
    prompt to `max_length` and then adds the chat template, which made the model input longer than
    `max_length`, and a later cut to `max_length` then dropped the question and the assistant's
    header. Here the halves are sized so that the whole model input, template and special tokens
    included, fits `max_length`: nothing downstream ever needs to cut it again.
    """
    prompt = GOV_REPORT_PROMPT.format(context=report)
    ids = model_input_ids(tokenizer, prompt)
    if len(ids) <= max_length:
        return ids, False

    bare = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    head, tail = GOV_REPORT_PROMPT.split("{context}")
    instructions = max(len(tokenizer(part, add_special_tokens=False)["input_ids"]) for part in (head, tail))
    budget = len(bare) - (len(ids) - max_length)  # bare-prompt tokens that fit beside the template
    for _ in range(_MAX_ROUNDS):
        half = budget // 2
        if half < instructions:
            raise KvsweepError(
                f"max_length {max_length} is too small for the summarization prompt: its instructions and "
                f"the model's template leave no room for the report (use a max_length of a few hundred tokens or more)"
            )
        cut = tokenizer.decode(bare[:half], skip_special_tokens=True) + tokenizer.decode(
            bare[-half:], skip_special_tokens=True
        )
        ids = model_input_ids(tokenizer, cut)
        if len(ids) <= max_length:
            return ids, True
        budget -= len(ids) - max_length
    raise KvsweepError(f"could not fit the summarization prompt into {max_length} tokens")


# kvpress's protocol splits the same prompt where the report ends: the context (instructions and
# report) is compressed, the question (the instruction after the report) is not.
GOV_REPORT_CONTEXT, _ = GOV_REPORT_PROMPT.split("{context}")
GOV_REPORT_CONTEXT += "{context}\n\n"
GOV_REPORT_QUESTION = "Now, write a one-page summary of the report.\n\nSummary:"
assert GOV_REPORT_CONTEXT.format(context="{context}") + GOV_REPORT_QUESTION == GOV_REPORT_PROMPT


def kvpress_ids(tokenizer, context: str, question: str) -> tuple[list[int], list[int]]:
    """The token ids kvpress's pipeline makes of (context, question): its own preprocessing
    (`KVPressTextGenerationPipeline.preprocess`: the chat template split around the context, or
    BOS + context and question + newline), called with the tokenizer alone, so that the two agree
    by construction."""
    from types import SimpleNamespace

    from kvpress.pipeline import KVPressTextGenerationPipeline

    if getattr(tokenizer, "chat_template", None) is None and getattr(tokenizer, "bos_token", None) is None:
        # kvpress's preprocessing prepends the BOS token as text, and fails on None.
        raise KvsweepError(
            "the tokenizer has neither a chat template nor a BOS token, which kvpress's pipeline needs to tokenize "
            "a context: this model cannot run the kvpress-protocol tasks"
        )

    tensors = KVPressTextGenerationPipeline.preprocess(
        SimpleNamespace(tokenizer=tokenizer), context, [question], answer_prefix="", max_context_length=10**12
    )
    return tensors["context_ids"][0].tolist(), tensors["questions_ids"][0][0].tolist()


def kvpress_summarization_inputs(
    tokenizer, report: str, max_length: int
) -> tuple[str, str, list[int], list[int], bool]:
    """(context, question, their ids as kvpress makes them, whether the report was cut) for
    `report`, context and question together at most `max_length` tokens: a report too long keeps
    its first and last halves of tokens (LongBench's rule, as `summarization_prompt_ids`)."""
    cut = False
    for _ in range(_MAX_ROUNDS):
        context = GOV_REPORT_CONTEXT.format(context=report)
        context_ids, question_ids = kvpress_ids(tokenizer, context, GOV_REPORT_QUESTION)
        excess = len(context_ids) + len(question_ids) - max_length
        if excess <= 0:
            return context, GOV_REPORT_QUESTION, context_ids, question_ids, cut
        bare = tokenizer(report, add_special_tokens=False)["input_ids"]
        half = (len(bare) - excess) // 2
        if half < 1:
            raise KvsweepError(
                f"max_length {max_length} is too small for the summarization prompt: its instructions and "
                f"the model's template leave no room for the report (use a max_length of a few hundred tokens or more)"
            )
        report = tokenizer.decode(bare[:half], skip_special_tokens=True) + tokenizer.decode(
            bare[-half:], skip_special_tokens=True
        )
        cut = True
    raise KvsweepError(f"could not fit the summarization prompt into {max_length} tokens")
