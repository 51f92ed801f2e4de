"""Loading a causal LM and its tokenizer from a hub id or a local folder, with readable errors."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvsweep.errors import KvsweepError, cannot_load, missing_local_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise KvsweepError("device 'cuda' was asked for, but no CUDA GPU is visible (use device: cpu)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise KvsweepError(f"device must be cpu or cuda, got '{device}'")
    return torch.device(device)


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    if dtype not in DTYPES:
        raise KvsweepError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if (missing := missing_local_path("model", name)) is not None:
        raise missing
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise cannot_load("model", name, err) from None
    return model.to(resolve_device(device)).eval()


def load_tokenizer(name: str):
    if (missing := missing_local_path("tokenizer", name)) is not None:
        raise missing
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise cannot_load("tokenizer", name, err) from None


def vocabulary_size(model) -> int:
    """Rows of the model's input embedding: token ids must be below this."""
    return model.get_input_embeddings().weight.shape[0]
