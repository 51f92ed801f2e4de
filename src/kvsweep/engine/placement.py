"""Which GPU each part of a model sits on when a job has several: the layers split into a pipeline.

A model larger than one GPU (Llama-3.1-70B is 141 GB in bf16) is spread over the job's GPUs by
transformers' `device_map` (accelerate's hooks move the hidden state from one GPU to the next).
The plan here is contiguous and even in decoder layers: each layer brings the same weights and the
same KV cache and eviction state (which grow with batch and length), so equal layer counts balance
both. The input embedding (and whatever precedes the layers) goes on the first GPU, the final norm
and the output head (and its batch x chunk x vocabulary logits) on the last, and the layers that do
not divide evenly go to the GPUs in between, which hold neither. Only one GPU computes at a time;
the split buys memory, not speed (the throughput of a split model is that of one GPU, less the
hand-overs: benchmarks/results/h100x4_multi_gpu_speed8b_kernel_2026-11-28.json).

accelerate's own "balanced" map was not used: it sizes the shares from the memory that is free when
the job starts and leaves the last GPU the remainder, so the same job could split differently from
run to run, and it does not count the cache.
"""

import copy

import torch
from torch import nn

from kvsweep.core.errors import KvsweepError


def layers_per_gpu(n_layers: int, n_gpus: int) -> list[int]:
    """How many consecutive decoder layers each GPU holds: n_layers // n_gpus each, and the
    remainder one apiece to the GPUs after the first (the first holds the embedding), the last one
    (the output head and its logits) only when every other already has one."""
    if n_gpus < 1:
        raise KvsweepError(f"a model needs at least one GPU, got {n_gpus}")
    if n_layers < n_gpus:
        raise KvsweepError(f"a model of {n_layers} layers cannot be split over {n_gpus} GPUs (at most one per layer)")
    counts = [n_layers // n_gpus] * n_gpus
    order = list(range(1, n_gpus - 1)) + [n_gpus - 1, 0] if n_gpus > 1 else [0]
    for gpu in order[: n_layers % n_gpus]:
        counts[gpu] += 1
    return counts


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that holds the decoder layers (`layers`), also in a multimodal model."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner


def placement_plan(model: nn.Module, n_gpus: int) -> dict[str, int]:
    """A `device_map` (module name -> GPU index) for `model` (its structure only: build it on the
    meta device) split over `n_gpus` GPUs, as `layers_per_gpu` says. Every parameter and buffer of
    the model lies in exactly one named module of the plan."""
    decoder = decoder_of(model)
    names = {module: name for name, module in model.named_modules()}
    prefix = names[decoder]
    counts = layers_per_gpu(len(decoder.layers), n_gpus)
    plan, layer = {}, 0
    for gpu, count in enumerate(counts):
        for _ in range(count):
            plan[f"{prefix}.layers.{layer}"] = gpu
            layer += 1
    last = n_gpus - 1
    for name, _ in decoder.named_children():
        if name != "layers":  # the embedding and rotary tables first, the final norm last
            plan[f"{prefix}.{name}"] = last if name == "norm" else 0
    # Beside the decoder, along the path to it: the output head goes last, unless it shares its
    # weight with the embedding (then with it); anything else (a vision tower) goes first.
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    path = prefix.split(".")
    on_path = {".".join(path[: i + 1]) for i in range(len(path))}
    for parent in [""] + [".".join(path[: i + 1]) for i in range(len(path) - 1)]:
        for name, child in (model.get_submodule(parent) if parent else model).named_children():
            full = f"{parent}.{name}" if parent else name
            if full not in on_path:
                plan[full] = last if child is head and not tied else 0
    return plan


def describe_plan(plan: dict[str, int]) -> str:
    """The decoder layers each GPU holds, for a log: 'layers 0-31 on GPU 0, 32-63 on GPU 1'."""
    layers = {}
    for name, gpu in plan.items():
        if name.rsplit(".", 2)[-2:-1] == ["layers"] and name.rsplit(".", 1)[-1].isdigit():
            layers.setdefault(gpu, []).append(int(name.rsplit(".", 1)[-1]))
    spans = [f"{min(held)}-{max(held)} on GPU {gpu}" for gpu, held in sorted(layers.items())]
    return "layers " + ", ".join(spans)


def plan_for_config(config, n_gpus: int) -> dict[str, int]:
    """`placement_plan` for a model of this configuration, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # (accelerate's init_empty_weights would leave tied weights untied)
        model = AutoModelForCausalLM.from_config(config)
    return placement_plan(model, n_gpus)


def visible_gpus(n_gpus: int) -> None:
    """A readable refusal when the job was given fewer GPUs than it asks to split over."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < n_gpus:
        raise KvsweepError(
            f"the model is to be split over {n_gpus} GPUs (gpus_per_job), but {count} "
            f"{'is' if count == 1 else 'are'} visible to this job (CUDA_VISIBLE_DEVICES)"
        )


def module_device(module: nn.Module) -> torch.device:
    """The device a module's weights are on (a layer's cache and eviction state go there too)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    raise ValueError(f"{type(module).__name__} holds no tensor to tell its device")


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices of a model's parameters, in the order the layers use them."""
    devices = []
    for tensor in model.parameters():
        if tensor.device not in devices:
            devices.append(tensor.device)
    return devices


def rotary_copy(rotary: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a model's rotary embedding on `device`, without accelerate's hook (which would send
    its inputs back to the original's GPU)."""
    from accelerate.hooks import remove_hook_from_module

    return remove_hook_from_module(copy.deepcopy(rotary)).to(device)


def keep_outputs_where_made(model: nn.Module) -> None:
    """A split model's logits stay on the GPU that computed them. accelerate's hook on the whole
    model would copy them back to the first GPU after every pass (batch x chunk x vocabulary), and a
    CUDA graph captured per GPU cannot hold a copy to another GPU's stream."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None:
        hook.io_same_device = False
