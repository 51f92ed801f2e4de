"""KVzip+ importance targets, what a KVzap surrogate learns to predict (KVzap, arXiv 2601.07891,
section 3; the kvpress repository's `kvzap/` recipe).

The model reads a document, a request to repeat it, then the document again (KVzip's repeat
prompt, arXiv 2505.23416). While it reproduces the copy, a KV pair that the copy's queries attend to
is one the model needs. For layer l, KV head k and position i of the first copy:

    target(l, k, i) = log max_{t in copy, h in group(k)}  a_h(t -> i) / ||x_t|| * ||W_o,h v_i||

with a_h(t -> i) head h's softmax attention of query t to key i, x_t the hidden state that enters
the layer's attention at t (after its input norm), W_o,h the columns of the output projection
that head h's output passes through, and v_i the value of i in head h's KV head. The features of
position i are x_i: exactly what `KVzapPress.score` gives the surrogate at inference.

The attention weights come from the model's eager attention (`attn_implementation="eager"`), so
every architecture transformers implements (rotary variants, QK norms, biases) is covered by the
model's own code, not by a copy of it.
"""

from dataclasses import dataclass

import torch

from kvsweep.core.errors import KvsweepError

REPEAT_REQUEST = "\n\nRepeat the previous context exactly."
_PLACEHOLDER = "\u2063KVSWEEP-DOCUMENT\u2063"  # a string no template or document contains


@dataclass(frozen=True)
class RepeatPrompt:
    """Token ids of `prefix, document, request, document, suffix`, and where the two copies lie."""

    input_ids: list[int]
    document: slice  # the first copy: the positions whose KV pairs are scored
    repeat: slice  # the copy: the queries that score them


def repeat_prompt(tokenizer, document_ids: list[int]) -> RepeatPrompt:
    """KVzip's repeat prompt around `document_ids` (the document's tokens, no special tokens).

    With a chat template: the user asks for the document then its repetition, the assistant answers
    with it (as the kvpress recipe does). Without one: the document, the request, the copy. BOS
    first if the tokenizer puts it first.
    The pieces around the document are tokenized apart from it, so both copies are token for token
    the same (tokenizing the whole text at once can merge a copy's first token with what precedes)."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": _PLACEHOLDER + REPEAT_REQUEST},
                {"role": "assistant", "content": _PLACEHOLDER},
            ],
            tokenize=False,
        )
        pieces = rendered.split(_PLACEHOLDER)
        if len(pieces) != 3:
            raise KvsweepError("the chat template does not show the user's and the assistant's messages as given")
        prefix, request, suffix = (tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in pieces)
        if bos and prefix[:1] != bos:  # a template that leaves BOS to the tokenizer
            prefix = bos + prefix
    else:
        prefix = bos
        request = tokenizer(REPEAT_REQUEST + "\n\n", add_special_tokens=False)["input_ids"]
        suffix = []
    first = len(prefix)
    second = first + len(document_ids) + len(request)
    ids = [*prefix, *document_ids, *request, *document_ids, *suffix]
    return RepeatPrompt(ids, slice(first, first + len(document_ids)), slice(second, second + len(document_ids)))


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts what it encodes with BOS (Llama's do, GPT-NeoX's do not): the
    repeat prompt starts as the model's inputs always do."""
    return tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]


def kvzip_plus_scores(
    attention: torch.Tensor,
    hidden_states: torch.Tensor,
    values: torch.Tensor,
    o_proj_weight: torch.Tensor,
    prompt: RepeatPrompt,
) -> torch.Tensor:
    """Targets (KV heads, document positions) of one layer and one sequence, in float32.

    attention: (heads, T, T) softmax weights; hidden_states: (T, hidden) entering attention;
    values: (KV heads, T, head_dim); o_proj_weight: (hidden, heads * head_dim)."""
    heads, kv_heads, head_dim = attention.shape[0], values.shape[0], values.shape[-1]
    group = heads // kv_heads
    doc, rep = prompt.document, prompt.repeat
    weights = attention[:, rep, doc].float()  # (heads, copy queries, document keys)
    weights = weights / hidden_states[rep].float().norm(dim=-1)[None, :, None]
    # ||W_o,h v_i||: head h's slice of the output projection applied to its KV head's values.
    w_o = o_proj_weight.float().view(-1, heads, head_dim)  # (hidden, heads, head_dim)
    v = values[:, doc].float().repeat_interleave(group, dim=0)  # (heads, document keys, head_dim)
    wov = torch.einsum("dhe,hie->hid", w_o, v).norm(dim=-1)  # (heads, document keys)
    scores = (weights * wov[:, None, :]).amax(dim=1)  # max over the copy's queries
    scores = scores.view(kv_heads, group, -1).amax(dim=1)  # max over the KV head's query heads
    return scores.log()


class KVzipTargetCollector:
    """Forward hooks on every attention layer of a model loaded with eager attention: one forward
    pass of a repeat prompt gives, per layer, the features (document positions x hidden) and the
    KVzip+ targets (document positions x KV heads)."""

    def __init__(self, model):
        layers = getattr(getattr(model, "model", None), "layers", None)
        attention = [getattr(layer, "self_attn", None) for layer in layers or []]
        if not attention or not all(hasattr(a, "o_proj") and hasattr(a, "layer_idx") for a in attention):
            raise KvsweepError(
                f"{type(model).__name__}: KVzip+ targets need decoder layers at model.model.layers whose "
                "self_attn has o_proj and layer_idx (Llama, Mistral, Qwen2/3 and their kin)"
            )
        if model.config._attn_implementation != "eager":
            raise ValueError(
                "KVzip+ targets need the attention weights: load the model with attn_implementation='eager'"
            )
        self.model = model
        self.layers = attention
        self._prompt: RepeatPrompt | None = None
        self._found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hook(self, module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        values = kwargs["past_key_values"].layers[module.layer_idx].values
        if output[1] is None:
            raise KvsweepError(f"layer {module.layer_idx}: the attention returned no weights (eager attention needed)")
        scores = kvzip_plus_scores(output[1][0], hidden[0], values[0], module.o_proj.weight, self._prompt)
        self._found[module.layer_idx] = (hidden[0, self._prompt.document], scores.T)
        return output

    @torch.no_grad()
    def collect(self, prompt: RepeatPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, targets) of one repeat prompt: (document positions, layers, hidden) in the
        model's dtype and (document positions, layers, KV heads) in float32."""
        from transformers import DynamicCache

        self._prompt, self._found = prompt, {}
        handles = [layer.register_forward_hook(self._hook, with_kwargs=True) for layer in self.layers]
        try:
            ids = torch.tensor([prompt.input_ids], device=self.model.device)
            # The values are read from the cache: its layers hold exactly what attention used. Built
            # without the config, every layer keeps every position (a config with a sliding window
            # gives layers that keep only the window's last tokens; its mask still applies).
            self.model.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        # (a split model's layers are on several GPUs: gathered on the first)
        features = torch.stack([self._found[i][0].to(ids.device) for i in range(len(self.layers))], dim=1)
        targets = torch.stack([self._found[i][1].to(ids.device) for i in range(len(self.layers))], dim=1)
        return features, targets
