"""The fusion table (`kvsweep.engine.integration.families`) against the installed transformers:
each declared class has the forward its fusion was written for, the sources the fusions reproduce
are the ones recorded, and what is not in the table (another family, another transformers,
Hugging Face's `kernels` wrapping) runs as it is and is said once."""

import hashlib
import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.models.llama import modeling_llama

from kvsweep.engine.integration import families, fusions, mirrors
from kvsweep.engine.models import what_ran

from conftest import tiny_llama

LLAMA = {"norm": "LlamaRMSNorm", "decoder_layer": "LlamaDecoderLayer", "attention": "LlamaAttention", "mlp": "LlamaMLP"}


def source(obj) -> str:
    return inspect.getsource(obj)


def test_the_installed_transformers_is_the_tested_one():
    """The fusion table was checked against this version (a newer one: check the table, then
    widen `TESTED_TRANSFORMERS` and pyproject.toml's range together)."""
    assert families.transformers_tested()


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda family: family.name)
def test_each_declared_class_has_llamas_forward(family):
    modeling = importlib.import_module(family.modeling)
    for role, llama_class in LLAMA.items():
        declared = family.class_of(role)
        if getattr(family, role) is None:
            continue
        assert declared is not None, f"{family.modeling} has no {getattr(family, role)}"
        assert source(declared.forward) == source(getattr(modeling_llama, llama_class).forward), (
            f"{declared.__name__}.forward is not {llama_class}.forward in this transformers: take it out of the table"
        )
    if family.rope:
        assert source(modeling.apply_rotary_pos_emb) == source(modeling_llama.apply_rotary_pos_emb)
        assert source(modeling.rotate_half) == source(modeling_llama.rotate_half)


def test_the_sources_the_fusions_reproduce_are_the_recorded_ones():
    """Fails when an upgrade changes a forward that a mirror copies or a kernel computes: then read
    the new source, update the mirror or the kernel, and the digest."""
    for name, digest in mirrors.SOURCES.items():
        obj = modeling_llama
        for part in name.split("."):
            obj = getattr(obj, part)
        assert hashlib.sha256(source(obj).encode()).hexdigest() == digest, name


def test_a_family_outside_the_table_runs_as_it_is_and_is_said_once(capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setattr(fusions, "_SAID", set())
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    for _ in range(2):
        with fusions.fused(model) as made:
            assert made.names() == [] and not any("forward" in vars(m) for m in model.modules())
    err = capsys.readouterr().err
    assert err.count("GPT2LMHeadModel is not in kvsweep's fusion table") == 1


def test_another_transformers_version_runs_as_it_is(capsys, monkeypatch):
    monkeypatch.setattr(fusions, "_SAID", set())
    monkeypatch.setattr(families, "TESTED_TRANSFORMERS", families.SpecifierSet("<1"))
    model = tiny_llama()
    original = modeling_llama.apply_rotary_pos_emb
    with fusions.fused(model) as made:
        assert made.names() == [] and modeling_llama.apply_rotary_pos_emb is original
        assert not any("forward" in vars(m) for m in model.modules())
    assert "is not a version kvsweep's fusions were checked against" in capsys.readouterr().err


def test_skipped_fusions_are_said_once(capsys, monkeypatch):
    """On the CPU the joined projections are not made (they run on a GPU only): the log says so,
    once per job."""
    monkeypatch.setattr(fusions, "_SAID", set())
    model = tiny_llama()
    for _ in range(2):
        with fusions.fused(model) as made:
            assert made.names() == [families.ROPE, families.NORM, families.RESIDUAL_NORM]
    err = capsys.readouterr().err
    assert err.count("fusions skipped for LlamaForCausalLM (not on a GPU): qkv, gate_up") == 1
    assert set(what_ran()["fusions"].split(",")) >= {families.ROPE, families.NORM}


class HubFunc(nn.Module):
    """What transformers makes of `apply_rotary_pos_emb` when Hugging Face's `kernels` package is
    installed (`use_kernel_func_from_hub`): a module instance that calls the function, whose
    source `inspect` cannot read."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def test_kvsweep_imports_under_the_kernels_packages_wrapping():
    """Nothing reads transformers' sources at import: the engine imports with the rotary function
    wrapped as `kernels` wraps it (this once raised a TypeError in every job)."""
    code = (
        "import torch, inspect\n"
        "from transformers.models.llama import modeling_llama as m\n"
        "class HubFunc(torch.nn.Module):\n"
        "    def __init__(self, f):\n        super().__init__(); self.f = f\n"
        "    def forward(self, *a, **k):\n        return self.f(*a, **k)\n"
        "m.apply_rotary_pos_emb = HubFunc(m.apply_rotary_pos_emb)\n"
        "import kvsweep.engine.press, kvsweep.engine.stream_nll\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "imported", result.stderr[-2000:]


def test_a_rotary_function_wrapped_by_the_kernels_package_is_fused_and_restored(monkeypatch):
    wrapped = HubFunc(modeling_llama.apply_rotary_pos_emb)
    with pytest.raises(TypeError):
        inspect.getsource(wrapped)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", wrapped)
    model = tiny_llama()
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    cos, sin = torch.rand(1, 3, 16), torch.rand(1, 3, 16)
    with fusions.fused(model) as made:
        assert families.ROPE in made.names() and modeling_llama.apply_rotary_pos_emb is not wrapped
        got = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)  # CPU tensors: the wrapped function runs
    assert modeling_llama.apply_rotary_pos_emb is wrapped
    assert all(torch.equal(a, b) for a, b in zip(got, wrapped(q, k, cos, sin), strict=True))
