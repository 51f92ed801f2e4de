"""kvsweep's fusions (`families`), turned on for a model while a press is active.

`fused(model)` replaces, for its duration, the forwards of the model's modules that the table
declares (and its family's RoPE function), and restores them after. Each replacement checks its
kernel's `supports` on every call and runs the module's own computation where it does not hold
(the CPU, another dtype or shape): eager passes and the CUDA graphs captured from them run the
same kernels. Joined weights stay joined after the context (`joined`). Where the model's family or
the installed transformers is not in the table, nothing is replaced, and the job's log says so
once.
"""

import contextlib
import functools
import sys
from dataclasses import dataclass, field
from importlib.metadata import version

from torch import nn

from kvsweep.engine.integration import families, mirrors
from kvsweep.engine.integration.hooks import hooked
from kvsweep.engine.integration.joined import joinable, joined, plain_silu, rounds
from kvsweep.kernels import rms_norm, rope

_SAID: set[str] = set()  # what the log was told once
_MADE: set[str] = set()  # every fusion this process made in a model (a result's provenance)


def made_names() -> list[str]:
    """The fusions this process made, in `families.FUSIONS`' order."""
    return [name for name in families.FUSIONS if name in _MADE]


def say_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        print(f"kvsweep: {line}", file=sys.stderr)


@dataclass
class Fusions:
    """What `fused` replaced, by fusion (`families.FUSIONS`): the modules (or modeling modules)."""

    replaced: dict[str, list] = field(default_factory=lambda: {name: [] for name in families.FUSIONS})

    def names(self) -> list[str]:
        """The fusions that replaced something, in `families.FUSIONS`' order."""
        return [name for name in families.FUSIONS if self.replaced[name]]


@contextlib.contextmanager
def fused(model: nn.Module):
    """For the duration, the model runs kvsweep's kernels where the table declares them; yields
    the `Fusions` made."""
    made = Fusions()
    family = families.family_of(model)
    if family is None:
        say_once(f"{type(model).__name__} is not in kvsweep's fusion table (kvsweep.engine.integration.families): "
                 "its modules run their own forwards, without kvsweep's fused kernels")  # fmt: skip
    elif not families.transformers_tested():
        say_once(f"transformers {version('transformers')} is not a version kvsweep's fusions were checked against "
                 f"({families.TESTED_TRANSFORMERS}): the model runs its own forwards")  # fmt: skip
        family = None
    originals = []  # (object, attribute, original)
    try:
        if family is not None:
            _fuse(model, family, made, originals)
            _say_skipped(model, family, made)
        _MADE.update(made.names())
        yield made
    finally:
        for owner, name, original in reversed(originals):
            if original is None:
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, original)


def _fuse(model: nn.Module, family: families.Family, made: Fusions, originals: list) -> None:
    modeling = sys.modules.get(family.modeling)
    if family.rope and modeling is not None and not isinstance(modeling.apply_rotary_pos_emb, functools.partial):
        original = modeling.apply_rotary_pos_emb
        originals.append((modeling, "apply_rotary_pos_emb", original))
        modeling.apply_rotary_pos_emb = functools.partial(_rotary, original)
        made.replaced[families.ROPE].append(modeling)
    roles = families.roles(model)
    own = [m for m in model.modules() if "forward" not in vars(m)]  # a forward set on the instance is kept
    norms = [m for m in own if type(m) in roles["norm"]]
    for norm in norms:
        _replace(norm, functools.partial(_norm_forward, norm), originals)
    made.replaced[families.NORM] = norms
    for layer in own:
        if (
            type(layer) in roles["decoder_layer"]
            and any(layer.post_attention_layernorm is norm for norm in norms)
            and not hooked(layer.post_attention_layernorm)
        ):
            _replace(layer, functools.partial(mirrors.decoder_layer_forward, layer), originals)
            made.replaced[families.RESIDUAL_NORM].append(layer)
    for module in own:
        if type(module) in roles["attention"]:
            projections, forward, fusion = (
                [module.q_proj, module.k_proj, module.v_proj],
                mirrors.attention_forward,
                families.QKV,
            )
        elif type(module) in roles["mlp"] and plain_silu(module.act_fn) and rounds(module):
            projections, forward, fusion = [module.gate_proj, module.up_proj], mirrors.mlp_forward, families.GATE_UP
        else:
            continue
        if joinable(projections):
            _replace(module, functools.partial(forward, module, *joined(projections)), originals)
            made.replaced[fusion].append(module)


def _say_skipped(model: nn.Module, family: families.Family, made: Fusions) -> None:
    """Once per job: the fusions the table declares for this family that replaced nothing here."""
    declared = {
        families.ROPE: family.rope,
        families.NORM: family.norm,
        families.RESIDUAL_NORM: family.decoder_layer,
        families.QKV: family.attention,
        families.GATE_UP: family.mlp,
    }
    skipped = [name for name in families.FUSIONS if declared[name] and not made.replaced[name]]
    if skipped:
        where = (
            "not on a GPU" if not any(p.is_cuda for p in model.parameters()) else "hooked, replaced or another dtype"
        )
        say_once(f"fusions skipped for {type(model).__name__} ({where}): {', '.join(skipped)}; those modules run "
                 "their own forwards")  # fmt: skip


def _replace(module: nn.Module, forward, originals: list) -> None:
    originals.append((module, "forward", None))
    module.forward = forward


def _norm_forward(norm: nn.Module, hidden_states):
    if rms_norm.supports(hidden_states, norm.weight):
        return rms_norm.rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    return type(norm).forward(norm, hidden_states)


def _rotary(original, q, k, cos, sin, unsqueeze_dim=1):
    """`original(q, k, cos, sin, unsqueeze_dim)` (a function, or the module transformers wraps it in
    when Hugging Face's `kernels` package is installed), by the kernel where it applies."""
    if not rope.supports(q, k, cos, sin, unsqueeze_dim):
        return original(q, k, cos, sin, unsqueeze_dim)
    return rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
