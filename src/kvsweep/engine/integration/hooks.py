"""Whether something of a module's own wraps its forward: a replacement would skip it."""

from torch import nn


def hooked(module: nn.Module) -> bool:
    """Forward hooks or pre-hooks of the module's own."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def wrapped(module: nn.Module) -> bool:
    """A forward replaced on the instance (accelerate's hook on a model split over GPUs), or hooks."""
    return "forward" in vars(module) or hooked(module)
