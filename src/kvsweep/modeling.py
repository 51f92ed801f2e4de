"""Loading a causal LM and its tokenizer from a hub id or a local folder, with readable errors."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvsweep.errors import KvsweepError, cannot_load

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
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise cannot_load("model", name, err) from None
    return model.to(resolve_device(device)).eval()


def load_tokenizer(name: str):
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise cannot_load("tokenizer", name, err) from None
