"""LongBench's GovReport summarization prompt (Bai et al., 2023, https://arxiv.org/abs/2308.14508)."""

GOV_REPORT_PROMPT = (
    "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
    "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
)


def summarization_prompt_ids(tokenizer, report: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of the prompt for `report`, and whether it was truncated.

    LongBench's rule: if the tokenized prompt is longer than `max_length`, keep its first and last
    `max_length // 2` tokens (the cut falls inside the report, the instructions survive), decode,
    and only then apply the model's chat template when its tokenizer has one.
    """
    prompt = GOV_REPORT_PROMPT.format(context=report)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > max_length
    if truncated:
        half = max_length // 2
        prompt = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[-half:], skip_special_tokens=True
        )
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return list(ids), truncated
