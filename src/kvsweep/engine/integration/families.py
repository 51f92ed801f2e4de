"""Which of kvsweep's fusions run for which transformers model classes, declared once.

A fusion replaces a module's forward (or its modeling module's RoPE function) with one that runs
kvsweep's kernels (`kvsweep.kernels`) and computes what the module's own forward computes, to the
rounding each kernel documents. A fusion is written for one forward: the table names, per model
family, the classes whose forward is that one, and `TESTED_TRANSFORMERS` the versions of
transformers it was checked against (tests/engine/test_integration.py compares, for the installed
version, each class's forward with Llama's and the mirrored forwards with the sources they copy).
A class is matched by identity, never by reading source at run time; a subclass, another family,
or another transformers version runs its own forwards (and the job's log says so once).
"""

import sys
from dataclasses import dataclass
from importlib.metadata import version

from packaging.specifiers import SpecifierSet

# The transformers versions the table and the mirrored forwards (`mirrors`) were checked against.
TESTED_TRANSFORMERS = SpecifierSet(">=5.2,<5.3")

# The fusions, by what they replace.
ROPE = "rope"  # the modeling module's `apply_rotary_pos_emb`: `kvsweep.kernels.rope`
NORM = "rms_norm"  # an RMSNorm's forward (LlamaRMSNorm's formula): `kvsweep.kernels.rms_norm`
RESIDUAL_NORM = "residual_norm"  # a decoder layer's residual add in its second norm's kernel
QKV = "qkv"  # an attention's q, k and v projections as one product
GATE_UP = "gate_up"  # an MLP's gate and up projections as one product, then `kvsweep.kernels.silu_and_mul`
FUSIONS = (ROPE, NORM, RESIDUAL_NORM, QKV, GATE_UP)


@dataclass(frozen=True)
class Family:
    """A model family of transformers and its classes that each fusion is written for: `norm`
    computes `LlamaRMSNorm.forward`; `decoder_layer`, `attention` and `mlp` have exactly the
    forwards of `LlamaDecoderLayer`, `LlamaAttention` and `LlamaMLP` (None: another forward, which
    runs as it is); `rope`: the module's `apply_rotary_pos_emb` and `rotate_half` are Llama's."""

    name: str
    norm: str | None = None
    decoder_layer: str | None = None
    attention: str | None = None
    mlp: str | None = None
    rope: bool = False

    @property
    def modeling(self) -> str:
        return f"transformers.models.{self.name}.modeling_{self.name}"

    def class_of(self, role: str) -> type | None:
        """The family's class for `role` ("norm", "decoder_layer", "attention", "mlp"), if its
        modeling module is loaded (a model of the family is), else None."""
        name = getattr(self, role)
        module = sys.modules.get(self.modeling)
        return None if name is None or module is None else getattr(module, name, None)


# transformers 5.2: Mistral's attention has a sliding window, Qwen2's a bias and a sliding window,
# Qwen3's per-head norms; their attentions run their own forwards (their norms and MLPs are fused).
FAMILIES = (
    Family("llama", norm="LlamaRMSNorm", decoder_layer="LlamaDecoderLayer", attention="LlamaAttention",
           mlp="LlamaMLP", rope=True),
    Family("mistral", norm="MistralRMSNorm", decoder_layer="MistralDecoderLayer", mlp="MistralMLP", rope=True),
    Family("qwen2", norm="Qwen2RMSNorm", decoder_layer="Qwen2DecoderLayer", mlp="Qwen2MLP", rope=True),
    Family("qwen3", norm="Qwen3RMSNorm", decoder_layer="Qwen3DecoderLayer", mlp="Qwen3MLP", rope=True),
)  # fmt: skip
BY_MODELING = {family.modeling: family for family in FAMILIES}


def transformers_tested() -> bool:
    """Whether the installed transformers is one the table was checked against."""
    return version("transformers") in TESTED_TRANSFORMERS


def family_of(model) -> Family | None:
    """The declared family of a model (by its class's module), or None."""
    return BY_MODELING.get(type(model).__module__)


def roles(model) -> dict[str, set[type]]:
    """The classes of the model's family for each role ("norm", "decoder_layer", ...), empty where
    the family or the transformers version is not in the table."""
    family = family_of(model)
    found = {role: set() for role in ("norm", "decoder_layer", "attention", "mlp")}
    if family is None or not transformers_tested():
        return found
    for role in found:
        if (cls := family.class_of(role)) is not None:
            found[role].add(cls)
    return found
