"""Tiny models, surrogates and documents built locally: the tests download nothing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

# The tests run their models on the CPU, where Triton's interpreter runs kvsweep's kernels (it is
# read when a kernel is defined, before kvsweep is imported). On a GPU machine,
# `TRITON_INTERPRET=0 pytest tests/kernels tests/engine/test_joined_projections.py` runs the kernel tests on the GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from transformers import LlamaConfig, LlamaForCausalLM

from kvsweep.engine import attention
from kvsweep.kernels import attention as attention_kernels
from kvsweep.kernels import decisions, entry_scores
from kvsweep.kernels import launches as kernel_launches

VOCAB = 97
# Where the kernel tests run their kernels: the CPU under Triton's interpreter, else the GPU.
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def every_pass_through_split_kernels(monkeypatch, interpreter_sms: int | None = None) -> list[int]:
    """As on a GPU: every pass attends through the Triton kernels (one-token passes included), in
    16 x 16 blocks, with keys split in shares of at least 16 (`interpreter_sms` multiprocessors
    taken, to split passes of more programs); the press stores entry scores and takes its
    decisions (H2O's score included) in `kvsweep.kernels.decisions`'s kernels. Returns the list the
    share counts of the passes are appended to, for the test to check that some pass was split."""
    if attention_kernels.triton is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(attention, "takes_kernels", lambda query, rows, accumulates: attention_kernels.supports(query))
    # What `supports` asks for, less the GPU: the kernels' `fits`.
    monkeypatch.setattr(decisions, "supports", decisions.fits)
    monkeypatch.setattr(entry_scores, "supports", entry_scores.fits)
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(kernel_launches, "FORWARD_LAUNCHES", (small,))
    monkeypatch.setattr(kernel_launches, "MIN_SPLIT_KEYS", 16)
    if interpreter_sms is not None:
        monkeypatch.setattr(kernel_launches, "INTERPRETER_SMS", interpreter_sms)
    splits = []
    key_splits = kernel_launches.key_splits
    monkeypatch.setattr(
        kernel_launches, "key_splits", lambda *args: splits.append(key_splits(*args)[0]) or key_splits(*args)
    )
    return splits


def kvsweep(*argv) -> None:
    """The `kvsweep` command, called in-process (a stage, as the workflow's jobs run it)."""
    from kvsweep.cli import main

    main([str(arg) for arg in argv])


def tiny_llama(seed: int = 0, layers: int = 2, head_dim: int = 16) -> LlamaForCausalLM:
    """A 2-layer grouped-query Llama (4 query heads, 2 KV heads) with peaked attention."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=1024,
        initializer_range=0.15,  # larger than usual so attention is far from uniform
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_surrogate(model, seed: int = 1, mlp: bool = True) -> KVzapModel:
    torch.manual_seed(seed)
    config = model.config
    return KVzapModel(
        KVzapConfig(
            input_dim=config.hidden_size,
            output_dim=config.num_key_value_heads,
            n_modules=config.num_hidden_layers,
            hidden_dim=16 if mlp else None,
        )
    ).eval()


def random_documents(lengths, seed: int = 2) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="session")
def model():
    return tiny_llama()


@pytest.fixture(scope="session")
def surrogate_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("surrogate")
    tiny_surrogate(model).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo, run once locally in a scratch directory as a user would (`--configfile demo/config.yaml`);
    shared by the workflow tests and the SLURM test, which compares its table with this one."""
    import time

    from workflow_helpers import ROOT, load_yaml, snakemake, write_config

    workdir = tmp_path_factory.mktemp("demo")
    config = load_yaml(ROOT / "demo" / "config.yaml")
    configfile = write_config(workdir, config)
    start = time.time()
    snakemake(workdir, configfile, "--cores", "2")
    print(f"demo wall time: {time.time() - start:.0f} s")
    return workdir, config
