"""Splitting a model over a job's GPUs: the placement plan, and the refusals, without GPUs."""

from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import check_device_map
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from kvsweep.core.errors import KvsweepError
from kvsweep.core.job import GPUS_VARIABLE, job_gpus
from kvsweep.engine.models import load_model, on_device
from kvsweep.engine.placement import describe_plan, layers_per_gpu, placement_plan, plan_for_config
from kvsweep.study.config import validate_config

from conftest import kvsweep

ROOT = Path(__file__).resolve().parents[2]


def tiny(config_class=LlamaConfig, layers=7, **extra):
    return config_class(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=97, **extra)  # fmt: skip


@pytest.mark.parametrize("n_layers", [1, 2, 5, 7, 32, 64, 80])
@pytest.mark.parametrize("n_gpus", [1, 2, 3, 4, 8])
def test_layer_counts_are_even_and_spare_the_ends(n_layers, n_gpus):
    if n_layers < n_gpus:
        with pytest.raises(KvsweepError, match=f"{n_layers} layers cannot be split over {n_gpus} GPUs"):
            layers_per_gpu(n_layers, n_gpus)
        return
    counts = layers_per_gpu(n_layers, n_gpus)
    assert sum(counts) == n_layers and len(counts) == n_gpus
    assert max(counts) - min(counts) <= 1 and min(counts) >= 1
    # The first GPU (embedding) gets a spare layer only when every other GPU has one.
    if n_gpus > 1 and counts[0] > min(counts):
        assert all(count == counts[0] for count in counts)
    # Likewise the last (output head and logits), before the first.
    if n_gpus > 2 and counts[-1] > min(counts):
        assert all(count == max(counts) for count in counts[1:])


def test_refuses_no_gpu():
    with pytest.raises(KvsweepError, match="at least one GPU"):
        layers_per_gpu(4, 0)


def owners(plan: dict, parameter: str) -> list[str]:
    return [name for name in plan if parameter == name or parameter.startswith(name + ".")]


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen3Config])
@pytest.mark.parametrize("n_gpus", [1, 2, 3, 4])
def test_plan_places_every_weight_once_in_layer_order(config_class, n_gpus):
    config = tiny(config_class)
    plan = plan_for_config(config, n_gpus)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        assert len(owners(plan, name)) == 1, name
    layer_gpus = [plan[f"model.layers.{i}"] for i in range(config.num_hidden_layers)]
    assert layer_gpus == sorted(layer_gpus) and set(layer_gpus) == set(range(n_gpus))
    assert [layer_gpus.count(gpu) for gpu in range(n_gpus)] == layers_per_gpu(config.num_hidden_layers, n_gpus)
    assert plan["model.embed_tokens"] == plan["model.rotary_emb"] == 0
    assert plan["model.norm"] == plan["lm_head"] == n_gpus - 1


def test_the_plan_is_described_for_the_log():
    assert describe_plan(plan_for_config(tiny(layers=7), 3)) == "layers 0-1 on GPU 0, 2-4 on GPU 1, 5-6 on GPU 2"


def test_a_tied_output_head_stays_with_the_embedding():
    plan = plan_for_config(tiny(tie_word_embeddings=True), 3)
    assert plan["lm_head"] == plan["model.embed_tokens"] == 0 and plan["model.norm"] == 2


def test_accelerate_accepts_the_plan():
    """accelerate's own check (which `dispatch_model` runs) finds every weight placed; and it is not
    a check that passes anything: without one layer the plan is refused."""
    config = tiny()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = placement_plan(model, 3)
    check_device_map(model, plan)
    del plan["model.layers.3"]
    with pytest.raises(ValueError, match="model.layers.3"):
        check_device_map(model, plan)


def test_splitting_needs_cuda_and_enough_gpus(tmp_path):
    AutoModelForCausalLM.from_config(tiny()).save_pretrained(tmp_path)
    with pytest.raises(KvsweepError, match="split over 2 GPUs needs device 'cuda', got 'cpu'"):
        load_model(str(tmp_path), device="cpu", gpus=2)
    if not torch.cuda.is_available():
        with pytest.raises(KvsweepError, match="no CUDA GPU is visible"):
            load_model(str(tmp_path), device="cuda", gpus=2)


def pretend_gpus(monkeypatch, count: int) -> None:
    """A CUDA runtime with `count` GPUs, as far as the checks before any GPU work can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_job_given_fewer_gpus_than_its_split_is_refused_before_any_gpu_work(monkeypatch, tmp_path, capsys):
    """Found on a 2-GPU host: the job's first stage boundary waited on the missing GPU (CUDA
    'invalid device ordinal') before the model's load could refuse."""
    pretend_gpus(monkeypatch, 1)
    with pytest.raises(KvsweepError, match=r"split over 2 GPUs \(gpus_per_job\), but 1 is visible"):
        on_device("cuda", 2)
    AutoModelForCausalLM.from_config(tiny(layers=2)).save_pretrained(tmp_path)
    shard = tmp_path / "shard.jsonl"
    shard.write_text('{"id": "a", "input_ids": [1, 2, 3, 4, 5, 6, 7, 8]}\n')
    monkeypatch.setenv(GPUS_VARIABLE, "3")
    with pytest.raises(SystemExit) as stop:
        kvsweep("evaluate", *["--model", str(tmp_path), "--device", "cuda", "--chunk-size", "4", "--max-length", "8",
                       "--data", str(shard), "--method", "baseline", "--output", str(tmp_path / "out.jsonl")])  # fmt: skip
    assert stop.value.code == 2
    assert "kvsweep evaluate: error: the model is to be split over 3 GPUs (gpus_per_job), but 1 is visible" in (
        capsys.readouterr().err
    )


def test_more_gpus_than_layers_is_refused(monkeypatch, tmp_path):
    pretend_gpus(monkeypatch, 4)
    AutoModelForCausalLM.from_config(tiny(layers=2)).save_pretrained(tmp_path)
    with pytest.raises(KvsweepError, match="a model of 2 layers cannot be split over 4 GPUs"):
        load_model(str(tmp_path), device="cuda", gpus=4)


def test_job_gpus_come_from_the_workflow_variable(monkeypatch):
    monkeypatch.delenv(GPUS_VARIABLE, raising=False)
    assert job_gpus("cuda", None) == 1 and job_gpus("cpu", 4) == 0
    monkeypatch.setenv(GPUS_VARIABLE, "4")
    assert job_gpus("cuda", None) == 4 and job_gpus("cuda", 2) == 2 and job_gpus("cpu", None) == 0
    monkeypatch.setenv(GPUS_VARIABLE, "two")
    with pytest.raises(KvsweepError, match=f"{GPUS_VARIABLE} must be a whole number of GPUs, got 'two'"):
        job_gpus("cuda", None)


def test_config_refuses_a_split_on_the_cpu():
    config = {**yaml.safe_load((ROOT / "demo" / "config.yaml").read_text()), "device": "cpu", "gpus_per_job": 2}
    with pytest.raises(KvsweepError, match="gpus_per_job: 2 splits the model over GPUs, but device is cpu"):
        validate_config(config)
