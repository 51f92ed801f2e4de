"""Which modules' forwards kvsweep may run its own code for: the class's forward is, character for
character, a transformers Llama class's (pinned by the sha256 of the source a mirror copies), and
nothing of the instance's own wraps it (an instance `forward`, such as accelerate's, or hooks)."""

import functools
import hashlib
import inspect

from torch import nn


def source_of(function) -> str | None:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return None


@functools.cache
def same_forward(cls: type, reference: type, sha256: str | None = None) -> bool:
    """Whether `cls.forward` has `reference.forward`'s source, and (with `sha256`) that source is
    the one whose hash is given: the version a mirrored copy was written from."""
    source = source_of(getattr(cls, "forward", None))
    return (
        source is not None
        and source == source_of(reference.forward)
        and (sha256 is None or hashlib.sha256(source.encode()).hexdigest() == sha256)
    )


def hooked(module: nn.Module) -> bool:
    """Forward hooks or pre-hooks of the module's own."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def wrapped(module: nn.Module) -> bool:
    """A forward replaced on the instance, or hooks: something a replacement would skip."""
    return "forward" in vars(module) or hooked(module)
