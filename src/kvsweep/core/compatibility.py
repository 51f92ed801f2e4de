"""Library versions kvsweep is known not to run with, found before transformers is first imported
(one message, not a traceback from inside transformers)."""

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

from kvsweep.core.errors import KvsweepError

# Hugging Face's `kernels` package, which transformers imports when it is installed: with
# transformers 5.2, kernels 0.17.0 to 0.19.1 stop `import transformers.models.llama` with a
# ValueError ("Either a revision or a version must be specified"); 0.9 to 0.16 import, and
# kvsweep runs with them (0.11 to 0.13 wrap `apply_rotary_pos_emb` in a module: kvsweep.kernels.rope).
KERNELS_BREAKING = Version("0.17")


def check_kernels_package() -> None:
    """Refuse a `kernels` package that breaks transformers' import (KERNELS_BREAKING and later)."""
    try:
        installed = version("kernels")
    except PackageNotFoundError:
        return
    if Version(installed) >= KERNELS_BREAKING:
        try:
            transformers = version("transformers")
        except PackageNotFoundError:
            transformers = "?"
        raise KvsweepError(
            f"Hugging Face's `kernels` {installed} is installed, and transformers {transformers} fails at import "
            f"with kernels {KERNELS_BREAKING} and later: pip install 'kernels<0.17' "
            "(or pip uninstall kernels; kvsweep does not use it)"
        )
