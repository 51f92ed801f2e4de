"""kvpress imported press by press: its package's `__init__` imports every one of its ~50 presses,
its pipeline (transformers' pipelines) and, through DuoAttention, `datasets`: about 1 s of a job's
imports on a CPU (the engine's imports took 5.6-6.6 s without it against 6.4-7.9 s with it, three
runs each, 2026-12-08), for the handful of presses kvsweep extends.

`without_package_init()` registers kvpress's package module unexecuted, so that `import
kvpress.presses.dms_press` loads that module and what it imports only, and applies kvpress's
attention patch itself (its `__init__`'s one side effect). The first attribute asked of the
package itself (`from kvpress import pipeline`, `kvpress.KnormPress`) runs its real `__init__`
then, minus the patch already applied, so code that uses kvpress whole sees it whole.
"""

import importlib.util
import sys


def without_package_init() -> None:
    """Make `kvpress`'s package init lazy (unless kvpress is imported already) and patch attention."""
    if "kvpress" in sys.modules:
        return
    spec = importlib.util.find_spec("kvpress")
    if spec is None:
        return  # not installed: the import that needs it says so
    package = importlib.util.module_from_spec(spec)

    def whole(name: str):
        """The package's real `__init__`, run once in the registered module, then `name` from it."""
        if name.startswith("__"):
            raise AttributeError(name)
        del package.__getattr__
        patches = sys.modules["kvpress.attention_patch"]
        patch, patches.patch_attention_functions = patches.patch_attention_functions, lambda: None
        try:
            spec.loader.exec_module(package)
        finally:
            patches.patch_attention_functions = patch
        return getattr(package, name)

    package.__getattr__ = whole
    sys.modules["kvpress"] = package
    from kvpress.attention_patch import patch_attention_functions

    patch_attention_functions()
