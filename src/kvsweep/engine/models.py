"""Loading a causal LM and its tokenizer from a hub id or a local folder, with readable errors."""

import sys
from importlib.metadata import PackageNotFoundError, version

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvsweep.core.errors import KvsweepError
from kvsweep.core.paths import cannot_load, incomplete_local_folder, missing_local_path
from kvsweep.core.provenance import source_revision
from kvsweep.engine.integration import fusions
from kvsweep.engine.placement import describe_plan, keep_outputs_where_made, plan_for_config, visible_gpus
from kvsweep.kernels.launches import LAUNCHED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise KvsweepError("device 'cuda' was asked for, but no CUDA GPU is visible (use device: cpu)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise KvsweepError(f"device must be cpu or cuda, got '{device}'")
    return torch.device(device)


def on_device(device: str, gpus: int = 1):
    """What waits for the queued work of `device` (of the first `gpus` GPUs for a split model): a
    stage boundary of `kvsweep.core.timing`."""
    device = resolve_device(device)
    if device.type != "cuda":
        return lambda: None
    if gpus > 1:
        visible_gpus(gpus)  # (the first wait, before the model's load, would fail on a missing GPU)
    devices = [device] if gpus <= 1 else [torch.device("cuda", index) for index in range(gpus)]

    def wait():
        for each in devices:
            torch.cuda.synchronize(each)

    return wait


def load_model(name: str, dtype: str = "float32", device: str = "cpu", attention: str = "sdpa", gpus: int = 1):
    """The model in eval mode on `device`. The weights are read straight onto the device
    (`device_map`), with no staging copy in host memory: for an 8B model that copy cost seconds
    of every job. `attention` is transformers' attention implementation: the engine's presses
    patch SDPA; KVzip+ targets need the weights of eager attention. With `gpus` > 1 (device
    "cuda"), the layers are split over GPUs 0..gpus-1 as `kvsweep.engine.placement` plans."""
    if dtype not in DTYPES:
        raise KvsweepError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if (missing := missing_local_path("model", name) or incomplete_local_folder("model", name)) is not None:
        raise missing
    target = resolve_device(device)
    try:
        if gpus > 1:
            if device != "cuda":
                raise KvsweepError(f"a model split over {gpus} GPUs needs device 'cuda', got '{device}'")
            visible_gpus(gpus)
            target = plan_for_config(AutoConfig.from_pretrained(name), gpus)
            # In the job's log: a count left in the environment would otherwise split silently.
            print(f"kvsweep: {name} split over {gpus} GPUs, {describe_plan(target)}", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=DTYPES[dtype], attn_implementation=attention, device_map=target
        )
    except KvsweepError:
        raise
    except Exception as err:  # noqa: BLE001 (transformers raises many types for a model it cannot read)
        raise cannot_load("model", name, err) from None
    keep_outputs_where_made(model)
    return model.eval()


def load_tokenizer(name: str):
    if (missing := missing_local_path("tokenizer", name) or incomplete_local_folder("tokenizer", name)) is not None:
        raise missing
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 (transformers raises many types, ImportError included, for a tokenizer it cannot read)
        raise cannot_load("tokenizer", name, err) from None


def vocabulary_size(model) -> int:
    """Rows of the model's input embedding: token ids must be below this."""
    return model.get_input_embeddings().weight.shape[0]


def environment(model, dtype: str) -> dict:
    """What a result was computed with: code, library versions, device and dtype."""

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    device = model.device
    return {
        "kvsweep": source_revision(),
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "kvpress": installed("kvpress"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype,
    }


def what_ran() -> dict:
    """The fusions this process made in a model (`kvsweep.engine.integration`) and the kernels it
    launched (`kvsweep.kernels`), so far: beside a result's `environment`."""
    return {"fusions": ",".join(fusions.made_names()) or "none", "kernels": ",".join(sorted(LAUNCHED)) or "none"}
