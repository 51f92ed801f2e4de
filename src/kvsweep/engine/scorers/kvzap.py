"""KVzap with an explicitly named surrogate."""

from dataclasses import dataclass
from typing import ClassVar

from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel, KVzapPress
from transformers import PretrainedConfig

from kvsweep.core.errors import KvsweepError
from kvsweep.core.paths import cannot_load, missing_local_path
from kvsweep.engine.placement import decoder_of, module_device
from kvsweep.engine.scorers.base import StreamingScorer, own_method
from kvsweep.kernels import surrogate_mlp
from kvsweep.study.methods.kvzap import default_surrogate


def load_surrogate(name: str) -> KVzapModel:
    """Load a KVzap surrogate from a local folder (`KVzapModel.save_pretrained`) or a hub id."""
    hint = ". Name it with --kvzap-surrogate (config: model.kvzap_surrogate)."
    if (missing := missing_local_path("KVzap surrogate", name)) is not None:
        raise missing
    try:
        model_type = PretrainedConfig.get_config_dict(name)[0].get("model_type")
    except (OSError, ValueError) as err:
        raise cannot_load("KVzap surrogate", name, err, hint) from None
    if model_type != KVzapConfig.model_type:
        raise KvsweepError(
            f"KVzap surrogate '{name}' holds a model of type '{model_type}', not a KVzap surrogate "
            f"(a folder saved with KVzapModel.save_pretrained){hint}"
        )
    try:
        return KVzapModel.from_pretrained(name)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise cannot_load("KVzap surrogate", name, err, hint) from None


@dataclass
class KVzapScorer(StreamingScorer, KVzapPress):
    """KVzap (https://arxiv.org/abs/2601.07891): a small surrogate (linear or
    2-layer MLP per layer) maps the layer's input hidden state of a token to one log-scale
    importance score per KV head. Higher means more important.

    kvpress's `KVzapPress` derives the surrogate's hub id from the model's name; this one takes it
    explicitly (`surrogate`: hub id or a folder saved with `KVzapModel.save_pretrained`), so a
    model loaded from a local folder or under another name can still name its surrogate. With
    `surrogate=None` the kvpress default name is used.
    """

    surrogate: str | None = None
    # The surrogate reads the hidden states only: the press gathers no keys or values for it.
    reads_cache: ClassVar[bool] = False

    def post_init_from_model(self, model):
        name = self.surrogate or default_surrogate(model.config.name_or_path, self.model_type)
        if name != self.kvzap_model_name:
            # Each layer's module on its layer's device (a split model's are on several GPUs) and in
            # the model's dtype at once (kvpress moves it on its first score, in the model's work),
            # so its cost is the surrogate's load.
            self.kvzap_model = load_surrogate(name).to(dtype=model.dtype).eval()
            for layer, module in zip(decoder_of(model).layers, self.kvzap_model.layers, strict=False):
                module.to(module_device(layer))
            self.kvzap_model_name = name
        config = model.config.get_text_config()
        surrogate_shape = (self.kvzap_model.config.n_modules, self.kvzap_model.config.output_dim)
        model_shape = (config.num_hidden_layers, config.num_key_value_heads)
        if surrogate_shape != model_shape:
            raise KvsweepError(
                f"KVzap surrogate '{name}' scores {surrogate_shape[0]} layers x {surrogate_shape[1]} KV heads, "
                f"the model has {model_shape[0]} x {model_shape[1]}: it belongs to another model"
            )

    def score_into(self, module, hidden_states, entry_scores, query_slots) -> bool:
        """On a GPU, for a pass of a few tokens (`surrogate_mlp.supports`): the MLP surrogate's
        scores written straight into the layer's float32 entry scores at the query slots, in two
        kernels. Returns whether it did; if not (or for a subclass with its own `score`), the press
        asks `score`."""
        if not own_method(self, "score", KVzapPress):
            return False
        mlp = self.kvzap_model.layers[module.layer_idx]
        if not surrogate_mlp.supports(mlp, hidden_states, entry_scores, query_slots):
            return False
        surrogate_mlp.score_into(entry_scores, hidden_states, mlp, query_slots)
        return True
