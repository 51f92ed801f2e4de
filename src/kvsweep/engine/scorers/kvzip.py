"""KVzip in kvpress's protocol: kvpress's own `KVzipPress` decides, for each document of a batch."""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import kvpress.presses.kvzip_press as kvzip_press
import torch
from kvpress.presses.kvzip_press import KVzipPress
from transformers import DynamicCache, Gemma3PreTrainedModel

from kvsweep.core.errors import KvsweepError
from kvsweep.engine.scorers.base import StreamingScorer


@dataclass
class KVzipScorer(StreamingScorer, KVzipPress):
    """KVzip (Kim et al. 2025, https://arxiv.org/abs/2505.23416): an entry matters as much as the
    model attends to it while it reconstructs its context. With `kvzip_plus_normalization`, KVzip+
    (KVzap, arXiv 2601.07891): the attention divided by the norm of the query's hidden state and
    multiplied by ||W_o v||, the score a KVzap surrogate learns to predict.

    Run as kvpress runs it, on each context of a batch alone (`prepare_contexts`): kvpress's
    `KVzipPress` prefills the context into a cache of its own, replays it `chunk_size` tokens at a
    time after a request to repeat it, scores each entry by the most attention a replayed query of
    its KV group pays it, and masks the lowest at `compression_ratio` over every layer and head at
    once (per layer with `layerwise`), the first `n_sink` never. kvsweep then masks the same entries
    in its own cache on the context's pass (`selects_at_ratio`). The cost: one prefill more than
    kvpress's pipeline (kvsweep's own), besides KVzip's replay (2 to 3 prefills, as kvpress warns)."""

    scores_on_entry: ClassVar[bool] = False
    selects_at_ratio: ClassVar[bool] = True
    # Per document of the batch being prepared: (layers, KV heads, context length), True where
    # kvpress's KVzipPress masks the entry.
    _masked: list = field(default_factory=list, init=False, repr=False)
    # The tokenizers KVzipPress asked for, by name (it loads the model's on every call).
    _tokenizers: dict = field(default_factory=dict, init=False, repr=False)

    def prepare_contexts(self, model, contexts: list[list[int]], ratio: float) -> None:
        if not hasattr(getattr(model, "model", None), "layers") or isinstance(model, Gemma3PreTrainedModel):
            raise KvsweepError(
                f"kvzip: kvpress's KVzipPress does not run on {type(model).__name__} (it replays the context "
                "through `model.model`, and refuses Gemma 3)"
            )
        self.compression_ratio = ratio
        layers = model.model.layers
        heads = model.config.get_text_config().num_key_value_heads
        if ratio == 0:  # KVzipPress masks nothing: no passes to make
            self._masked = [
                torch.zeros(len(layers), heads, len(ids), dtype=torch.bool, device=model.device) for ids in contexts
            ]
            return
        self._masked = []
        with self._tokenizer_loaded_once() as tokenizer:
            prefix = template_prefix(tokenizer(model.config.name_or_path))
            for ids in contexts:
                if ids[: len(prefix)] != prefix:
                    raise KvsweepError(
                        "kvzip: the context does not start with the chat template's prefix, which kvpress's "
                        f"KVzipPress takes every context to start with and never replays ({len(prefix)} tokens; "
                        "kvpress's pipeline builds contexts so, as summarization_kvpress does): a bare text's first "
                        "positions would be evicted first"
                    )
                self._masked.append(self._kvpress_masks(model, ids, layers, heads))

    def forget_contexts(self) -> None:
        self._masked = []

    def _kvpress_masks(self, model, ids: list[int], layers, heads: int) -> torch.Tensor:
        """(layers, KV heads, len(ids)): the entries kvpress's KVzipPress masks in the context `ids`."""
        masked = torch.zeros(len(layers), heads, len(ids), dtype=torch.bool, device=model.device)
        try:
            with torch.inference_mode(), self(model):
                # (keyword arguments: KVzipPress reads them to find the context and its cache)
                model.model(input_ids=torch.tensor([ids], device=model.device), past_key_values=DynamicCache())
            for i, layer in enumerate(layers):
                indices = getattr(layer.self_attn, "masked_key_indices", None)
                if indices is not None:
                    masked[i, indices[1].to(masked.device), indices[2].to(masked.device)] = True
        finally:
            for layer in layers:  # what kvpress's attention would read on the next pass
                layer.self_attn.masked_key_indices = None
        return masked

    @contextmanager
    def _tokenizer_loaded_once(self):
        """KVzipPress reads and parses the model's tokenizer files on each call, once per context
        here: for the duration, its module's `AutoTokenizer` hands out the one this scorer loaded
        first (once per job). Yields that loader."""
        loader = kvzip_press.AutoTokenizer
        loaded = self._tokenizers

        class LoadedOnce:
            @staticmethod
            def from_pretrained(name, *args, **kwargs):
                if name not in loaded:
                    loaded[name] = loader.from_pretrained(name, *args, **kwargs)
                return loaded[name]

        kvzip_press.AutoTokenizer = LoadedOnce
        try:
            yield LoadedOnce.from_pretrained
        finally:
            kvzip_press.AutoTokenizer = loader

    def selected(self, module, position: torch.Tensor) -> torch.Tensor:
        """(batch, KV heads, slots): the entries KVzipPress masked, at the slots' `position`s."""
        if len(self._masked) != position.shape[0]:
            raise ValueError("KVzip decides from kvpress's passes over each context: prepare_contexts first")
        heads = self._masked[0].shape[1]
        chosen = torch.zeros(position.shape[0], heads, position.shape[1], dtype=torch.bool, device=position.device)
        for b, masked in enumerate(self._masked):
            layer = masked[module.layer_idx].to(position.device)
            inside = (position[b] >= 0) & (position[b] < layer.shape[-1])
            chosen[b] = layer[:, position[b].clamp(0, layer.shape[-1] - 1)] & inside
        return chosen

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        raise ValueError("KVzip has no score of its own here: it selects at a compression ratio (selected)")


def template_prefix(tokenizer) -> list[int]:
    """The tokens KVzipPress takes every context to start with and never replays (kvpress 0.5.5,
    `KVzipPress.__call__`): the chat template's text before the user's message, none without a
    template."""
    if tokenizer.chat_template is None:
        return []
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + separator}], add_generation_prompt=True, tokenize=False,
        enable_thinking=False,
    )  # fmt: skip
    return tokenizer.encode(text.split(separator)[0].split(dummy)[0], add_special_tokens=False)
