"""The old paths, timed beside kvsweep as anchors: the eager transformers loop, kvpress's own
`DMSPress` (fake-key masking), and kvpress's generation pipeline."""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from kvpress import DMSPress, KVzapPress
from transformers import DynamicCache


def upstream_kvzap_press(model, surrogate, threshold, decoding=True):
    """kvpress's own DMSPress(KVzapPress), with the random surrogate under the name it expects."""
    scorer = KVzapPress(model_type="mlp")
    scorer.kvzap_model = surrogate
    scorer.kvzap_model_name = f"nvidia/KVzap-mlp-{str(model.config.name_or_path).split('/')[-1]}"
    return DMSPress(scorer, threshold=threshold, sliding_window_size=128, decoding=decoding)


def upstream_stream(model, ids, chunk, press):
    """The old loop on upstream kvpress: DMSPress(decoding=True) with fake-key masking."""
    cache = DynamicCache(config=model.config)
    total = torch.zeros((), device="cuda", dtype=torch.float64)
    with torch.inference_mode(), press(model) if press is not None else nullcontext():
        for s in range(0, ids.shape[1], chunk):
            e = min(s + chunk, ids.shape[1])
            pos = torch.arange(s, e, device="cuda")
            logits = model(input_ids=ids[:, s:e], position_ids=pos.expand(ids.shape[0], -1), cache_position=pos,
                           past_key_values=cache, use_cache=True).logits  # fmt: skip
            if e < ids.shape[1]:
                target = ids[:, s + 1 : e + 1]
                total += F.cross_entropy(
                    logits[:, : target.shape[1]].float().flatten(0, 1), target.flatten(), reduction="sum"
                )
    return float(total)


def kvpress_text_pipeline(model):
    """kvpress's generation pipeline over `model`, fed token ids (its tokenizer only decodes)."""
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    )
    return KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)


def kvpress_pipeline(model, surrogate, threshold, context_ids, new_tokens, question_ids=None, decoding=True):
    """kvpress's generation pipeline: one prefill of the context, then the question (default: the
    context's first 16 tokens) and decoding; with DMSPress(KVzap) unless `threshold` is None."""
    pipe = kvpress_text_pipeline(model)
    question = context_ids[:, :16] if question_ids is None else question_ids
    press = None if threshold is None else upstream_kvzap_press(model, surrogate, threshold, decoding)

    def run():
        with torch.inference_mode():
            return pipe._forward(
                {"context_ids": context_ids, "questions_ids": [question]}, max_new_tokens=new_tokens, press=press
            )

    return run
