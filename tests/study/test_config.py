"""Config validation: defaults, canonical thresholds, and one readable message per mistake."""

import copy
from pathlib import Path

import pytest
import yaml

from kvsweep.core.errors import KvsweepError
from kvsweep.core.thresholds import canonical_threshold
from kvsweep.study.config import method_settings, validate_config
from kvsweep.study.shards import documents_per_shard

ROOT = Path(__file__).resolve().parents[2]


def shipped(name="config.yaml"):
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize(
    "spellings,canonical",
    [
        ([-5, -5.0, "-5", "-5.00", "-5.0e0"], "-5"),
        ([5e-4, 0.0005, "5e-4", "5.0e-4", "0.00050"], "0.0005"),
        ([1e-5, "1.0e-5", 0.00001], "1e-05"),
        ([float("-inf"), "-inf"], "-inf"),
        ([0, 0.0, -0.0, "0"], "0"),
        ([-6.5, "-6.50"], "-6.5"),
    ],
)
def test_canonical_threshold_is_one_path_per_value(spellings, canonical):
    assert {canonical_threshold(s) for s in spellings} == {canonical}
    assert float(canonical) == float(spellings[0])


def test_shipped_configs_are_valid_and_get_defaults():
    for name in ("config.yaml", "demo/config.yaml"):
        config = validate_config(shipped(name))
        assert config["methods"]["baseline"] == {"type": "baseline"}
        assert config["bootstrap"]["n_resamples"] >= 100
    config = validate_config(shipped())
    assert config["model"]["name"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert config["methods"]["h2o"]["canonical_values"] == ["0.0005"]
    assert config["methods"]["h2o"]["canonical_targets"] == [
        "0.1",
        "0.2",
        "0.3",
        "0.4",
        "0.5",
        "0.6",
        "0.7",
        "0.8",
        "0.9",
    ]
    minimal = validate_config(
        {"run": "x", "model": {"name": "m"}, "dataset": {"source": "d.jsonl"}, "methods": {"baseline": None}}
    )
    assert (
        minimal["chunk_size"] == 128
        and minimal["dataset"]["max_length"] == 8192
        and minimal["resources"]["runtime"] == 240
        and minimal["cuda_graphs"] is True
    )


@pytest.mark.parametrize(
    "dataset,documents",
    [
        ({}, 128),  # the shipped budget: 1,048,576 tokens of documents of up to 8,192
        ({"max_length": 4096}, 256),
        ({"shard_tokens": 100_000}, 12),
        ({"shard_tokens": 100}, 1),  # at least one document
        ({"shard_tokens": 100, "shard_size": 7}, 7),  # an explicit count wins
    ],
)
def test_documents_per_shard_follow_the_token_budget(dataset, documents):
    config = shipped()
    config["dataset"].pop("shard_tokens", None)
    config["dataset"].update(dataset)
    assert documents_per_shard(validate_config(config)) == documents


def test_the_commented_reference_methods_of_the_shipped_study_are_valid():
    """config.yaml lists the old system's reference points commented out; uncommented, they are a
    valid study (this keeps the comment from rotting)."""
    text = (ROOT / "config.yaml").read_text()
    uncommented = "\n".join(
        line.replace("  # ", "  ", 1) if line.startswith("  # ") else line for line in text.splitlines()
    )
    methods = validate_config(yaml.safe_load(uncommented))["methods"]
    assert {"streaming_llm", "random", "knorm", "expected_attention", "observed_attention"} <= set(methods)
    assert methods["streaming_llm"]["canonical_values"] == ["256", "512", "1024", "2048", "4096"]


def test_each_method_gets_only_its_own_settings():
    config = validate_config(shipped())
    assert method_settings(config, "h2o") == {"local_window": 512, "sinks": 0}
    assert method_settings(config, "kvzap") == {
        "sliding_window": 128,
        "sinks": 4,
        "kvzap_surrogate": "nvidia/KVzap-mlp-Llama-3.1-8B-Instruct",
        "kvzap_type": "mlp",
    }
    assert method_settings(config, "baseline") == {}


def test_entries_name_a_type_and_variants_keep_their_defaults():
    """`type:` runs one method under several names with other settings; a variant is a method
    with other defaults; an entry's type defaults to its name."""
    config = shipped()
    config["methods"] = {
        "baseline": None,
        "h2o_w128": {"type": "h2o", "local_window": 128, "thresholds": [0.001]},
        "h2o_w512": {"type": "h2o", "thresholds": [0.001]},
        "observed_attention": {"thresholds": [0.001]},
        "kvzap_no_sink": {"thresholds": [-5]},
        "streaming_llm": {"sliding_windows": [256, 64]},
        "ea": {"type": "expected_attention", "use_covariance": False, "thresholds": [0.01]},
    }
    config = validate_config(config)
    assert method_settings(config, "h2o_w128") == {"local_window": 128, "sinks": 0}
    assert method_settings(config, "h2o_w512") == {"local_window": 512, "sinks": 0}
    assert method_settings(config, "observed_attention") == {"local_window": 128, "sinks": 0}
    assert method_settings(config, "kvzap_no_sink")["sinks"] == 0
    assert method_settings(config, "streaming_llm") == {"sliding_window": 128, "sinks": 4}
    assert config["methods"]["streaming_llm"]["canonical_values"] == ["256", "64"]
    assert method_settings(config, "ea") == {
        "sliding_window": 128, "sinks": 4, "n_future_positions": 512, "use_covariance": False, "use_vnorm": True
    }  # fmt: skip
    assert config["methods"]["h2o_w128"]["type"] == "h2o" and config["methods"]["observed_attention"]["type"] == (
        "observed_attention"
    )
    # Validating again changes nothing.
    assert validate_config(copy.deepcopy(config)) == config


def edit(path: str, value):
    config = shipped()
    target = config
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[key]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return config


DELETE = object()

BAD = [
    ("model.dtype", "fp8", "model.dtype: 'fp8' is not allowed (allowed values: bfloat16, float32, float16)"),
    ("device", "tpu", "device: 'tpu' is not allowed (allowed values: cuda, cpu)"),
    ("chunk_size", 0, "chunk_size: 0 is less than the minimum of 1"),
    ("methods.h2o.thresholds", [0.1, "abc"], "methods.h2o.thresholds[1]"),
    ("methods.h2o.thresholds", [0.1, float("nan")], "methods.h2o.thresholds[1]: threshold NaN is not allowed"),
    ("methods.kvzap.thresholds", [-5, "-5.0"], "methods.kvzap.thresholds lists -5 twice (as -5 and '-5.0')"),
    ("methods.h2o.thresholds", [0.0005, "5e-4"], "methods.h2o.thresholds lists 0.0005 twice (as 0.0005 and '5e-4')"),
    ("methods.h2o.thresholds", [-5], "methods.h2o.thresholds[0]: threshold -5 is outside [0, 1], the range of its score"),
    ("methods.h2o.target_densities", [0.3, 0.30], "methods.h2o.target_densities lists 0.3 twice"),
    ("methods.h2o.target_densities", [0.3, 1.0], "methods.h2o.target_densities[1]: 1.0 is greater than or equal to the maximum of 1"),
    ("methods.h2o.target_densities", [0], "methods.h2o.target_densities[0]: 0 is less than or equal to the minimum of 0"),
    ("methods.baseline", {"target_densities": [0.5]}, "methods.baseline: Additional properties are not allowed ('target_densities' was unexpected) (allowed keys: type)"),
    ("calibration.tolerance", 0, "calibration.tolerance: 0 is less than or equal to the minimum of 0"),
    ("comparison.density", "density", "comparison.density: 'density' is not allowed (allowed values: kv_density_compressible, kv_density)"),
    ("methods.h2o.thresholds", [], "methods.h2o.thresholds: [] should be non-empty"),
    ("methods.pyramidkv", {"thresholds": [1]}, "methods.pyramidkv: unknown method 'pyramidkv' (known methods: baseline, kvzap, kvzap_no_sink, h2o, observed_attention, streaming_llm, random, expected_attention, knorm, snapkv, kvzip; another name needs `type:`)"),
    ("methods.h2o_w128", {"type": "h2o_128", "thresholds": [1]}, "methods.h2o_w128.type: unknown method 'h2o_128'"),
    ("methods.baseline", {"thresholds": [1]}, "methods.baseline: Additional properties are not allowed ('thresholds' was unexpected) (allowed keys: type)"),
    ("methods.baseline", {"type": "h2o", "thresholds": [1]}, "methods.baseline: the entry named baseline must be the uncompressed baseline"),
    ("methods.h2o.sliding_window", 64, "methods.h2o: Additional properties are not allowed ('sliding_window' was unexpected) (allowed keys: adaptive, adaptive_safeguard, compression_ratios, local_window, sinks, target_densities, thresholds, type)"),
    ("methods.h2o.sinks", -1, "methods.h2o.sinks: -1 is less than the minimum of 0"),
    ("methods.h2o.sinks", 2.5, "methods.h2o.sinks: 2.5 is not of type 'integer'"),
    ("methods.expected_attention", {"thresholds": [0.1], "use_vnorm": "yes"}, "methods.expected_attention.use_vnorm: 'yes' is not of type 'boolean'"),
    ("methods.kvzap.kvzap_type", "mlp", "methods.kvzap: Additional properties are not allowed ('kvzap_type' was unexpected)"),
    ("methods.streaming_llm", {"thresholds": [0.1]}, "methods.streaming_llm: Additional properties are not allowed ('thresholds' was unexpected) (allowed keys: compression_ratios, sinks, sliding_windows, type)"),
    ("methods.streaming_llm", {"sliding_windows": [64, 64.0]}, "methods.streaming_llm.sliding_windows lists 64 twice (as 64 and 64.0)"),
    ("methods.streaming_llm", {"sliding_windows": [64, 6.5]}, "methods.streaming_llm.sliding_windows[1]: 6.5 is not of type 'integer'"),
    ("methods.streaming_llm", {"sliding_windows": [64, 64]}, "methods.streaming_llm.sliding_windows lists 64 twice"),
    ("methods.streaming_llm", {"sinks": 4}, "methods.streaming_llm: 'streaming_llm' needs sliding_windows or compression_ratios (either)"),
    ("methods.random", {"thresholds": [0.5], "seed": "x"}, "methods.random.seed: 'x' is not of type 'integer'"),
    ("methods.random", {"thresholds": [0.5], "seed": 2**32}, "methods.random.seed: 4294967296 is greater than the maximum of 4294967295"),
    ("methods.h2o_list", {"type": ["h2o"], "thresholds": [1]}, "methods.h2o_list.type: ['h2o'] is not a method name"),
    ("methods.again", {"type": "baseline"}, "methods.again.type: only the entry named baseline is the uncompressed baseline"),
    ("methods.h2o.window", 64, "methods.h2o: Additional properties are not allowed ('window' was unexpected) (allowed keys:"),
    ("dataset.source", DELETE, "dataset: 'source' is a required property"),
    ("dataset.min_length", 10000, "dataset.min_length (10000) exceeds dataset.max_length (8192)"),
    ("run", "my study", "run: 'my study' does not match"),
    ("run", "..", "run: '..' does not match"),
    ("run", ".", "run: '.' does not match"),
    ("run", "../elsewhere", "run: '../elsewhere' does not match"),
    ("run", "a/b", "run: 'a/b' does not match"),
    ("run", ".hidden", "run: '.hidden' does not match"),
    ("run", "-rf", "run: '-rf' does not match"),
    ("methods.baseline", DELETE, "methods: 'baseline' is missing; every quality difference is paired with the uncompressed baseline"),
    ("methods.h2o.thresholds", [1e400], "methods.h2o.thresholds[0]: threshold inf is +infinity (a number too large for a float"),
    ("methods.h2o.thresholds", ["1e400"], "methods.h2o.thresholds[0]: threshold '1e400' is +infinity"),
    ("methods.h2o.thresholds", ["inf"], "methods.h2o.thresholds[0]: threshold 'inf' is +infinity"),
    ("dataset.shard_tokens", 0, "dataset.shard_tokens: 0 is less than the minimum of 1"),
    ("calibration.skip_documents", 99, "calibration.skip_documents (99) is below dataset.max_documents (100): the calibration documents would be evaluated documents too"),
    ("dataset.shard_size", 0, "dataset.shard_size: 0 is less than the minimum of 1"),
    ("dataset.shard_size", "all", "dataset.shard_size: 'all' is not of type 'integer', 'null'"),
    ("gpus", 1, "top level: Additional properties are not allowed ('gpus' was unexpected) (allowed keys: batch_size,"),
    ("summarization_kvpress", {"decoding": "yes"}, "summarization_kvpress.decoding: 'yes' is not of type 'boolean'"),
    ("perplexity_kvpress", {"continuation_tokens": 0}, "perplexity_kvpress.continuation_tokens: 0 is less than the minimum of 1"),
    ("tasks", ["perplexity", "perplexity_streaming"], "tasks[1]: 'perplexity_streaming' is not allowed (allowed values: perplexity, summarization, perplexity_kvpress, summarization_kvpress)"),
]  # fmt: skip


def test_the_continuation_scored_in_kvpress_protocol_is_shorter_than_every_document():
    config = edit("tasks", ["perplexity", "perplexity_kvpress"])
    config["perplexity_kvpress"] = {"continuation_tokens": 1024}
    with pytest.raises(KvsweepError) as err:
        validate_config(config)
    assert "perplexity_kvpress.continuation_tokens (1024): every document needs more tokens" in str(err.value)
    assert "dataset.min_length is 1024" in str(err.value)
    config["perplexity_kvpress"] = {"continuation_tokens": 1023}
    assert validate_config(config)["perplexity_kvpress"] == {"continuation_tokens": 1023}


@pytest.mark.parametrize("path,value,message", BAD)
def test_bad_config_names_the_key(path, value, message):
    with pytest.raises(KvsweepError) as err:
        validate_config(edit(path, value))
    assert message in str(err.value)


@pytest.mark.parametrize("keep", ["thresholds", "target_densities", None])
def test_a_method_needs_thresholds_or_target_densities(keep):
    config = shipped()
    for key in ("thresholds", "target_densities"):
        if key != keep:
            del config["methods"]["kvzap"][key]
    if keep:
        assert validate_config(config)["methods"]["kvzap"][
            f"canonical_{'targets' if keep != 'thresholds' else 'values'}"
        ]
    else:
        with pytest.raises(
            KvsweepError, match=r"methods.kvzap: 'kvzap' needs thresholds, target_densities or compression_ratios \(any"
        ):
            validate_config(config)


def test_validation_does_not_depend_on_input_order():
    """The same config with every mapping's keys in reverse order validates to the same result."""

    def reversed_keys(value):
        if isinstance(value, dict):
            return {key: reversed_keys(value[key]) for key in reversed(list(value))}
        return value

    config = shipped()
    backwards = reversed_keys(copy.deepcopy(config))
    assert list(backwards) != list(config) and list(backwards["methods"]) != list(config["methods"])
    assert validate_config(backwards) == validate_config(copy.deepcopy(config))


@pytest.mark.parametrize("run", ["study", "a.b", "x..y", "A_1-2", "v1.0", "a" * 80])
def test_every_accepted_run_name_keeps_outputs_under_results(run):
    config = edit("run", run)
    validate_config(config)
    results = Path("results").resolve()
    assert (results / config["run"]).resolve().parent == results


def test_the_schema_is_found_after_a_non_editable_install(tmp_path):
    """`python -m kvsweep config` from a wheel-style install (no source tree beside it): the schema
    and the demo's bundled model are package data."""
    import subprocess
    import sys

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(ROOT)], check=True, capture_output=True)  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", "import sys, kvsweep, runpy; print(kvsweep.__file__); sys.argv[1:1] = ['config']; "
         "runpy.run_module('kvsweep', run_name='__main__')", str(ROOT / "config.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(str(target))
    assert "local_window: 512" in result.stdout
    assert sorted(p.name for p in (target / "kvsweep" / "demo" / "model").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "surrogate,trained",
    [
        ("train", "results/x/kvzap_surrogate/mlp"),
        ("./surrogates/mine", None),  # a local folder: given (a missing one is an error, found before any job)
        ("nvidia/KVzap-mlp-Llama-3.1-8B-Instruct", None),  # a hub id: loaded
        (None, None),  # kvpress's derived hub id
    ],
)
def test_which_surrogate_the_workflow_trains(surrogate, trained):
    from kvsweep.study.config import method_settings, surrogate_to_train
    from kvsweep.study.shards import surrogate_offset

    config = validate_config({"run": "x", "model": {"name": "m", "kvzap_surrogate": surrogate},
                              "dataset": {"source": "d.jsonl", "max_documents": 30}, "calibration": {"documents": 5},
                              "methods": {"baseline": None, "kvzap": {"thresholds": [-5]}, "h2o": {"thresholds": [0.01]}}})  # fmt: skip
    assert surrogate_to_train(config) == trained
    # The KVzap jobs read the surrogate from where it is trained; the other methods never see it.
    assert method_settings(config, "kvzap")["kvzap_surrogate"] == (trained or surrogate)
    assert "kvzap_surrogate" not in method_settings(config, "h2o")
    assert surrogate_offset(config) == 35  # after the study's 30 and the calibration's 5
    config["model"]["kvzap_type"] = "linear"
    assert surrogate_to_train(config) == (trained and "results/x/kvzap_surrogate/linear")


def test_surrogate_settings_are_checked():
    base = {"run": "x", "model": {"name": "m"}, "dataset": {"source": "d.jsonl"}, "methods": {"baseline": None}}
    config = validate_config(copy.deepcopy(base))
    assert config["surrogate"]["documents"] == 128 and config["surrogate"]["max_length"] == 1024
    with pytest.raises(KvsweepError, match="surrogate.validation_documents: 0 is less than the minimum of 1"):
        validate_config({**copy.deepcopy(base), "surrogate": {"validation_documents": 0}})
    with pytest.raises(KvsweepError, match=r"surrogate: .*\(allowed keys: batch_size, documents"):
        validate_config({**copy.deepcopy(base), "surrogate": {"document": 3}})


def with_kvpress_task(**methods):
    config = shipped()
    config["tasks"] = ["perplexity", "summarization_kvpress"]
    config["methods"] = {"baseline": None, **methods}
    return config


def test_compression_ratios_are_kvpress_budgets_in_canonical_spelling():
    config = validate_config(with_kvpress_task(knorm={"compression_ratios": [0.5, "2.5e-1", 0, 0.90]}))
    assert config["methods"]["knorm"]["canonical_ratios"] == ["0.5", "0.25", "0", "0.9"]
    assert (
        config["methods"]["knorm"]["canonical_values"] == [] and config["methods"]["knorm"]["canonical_targets"] == []
    )
    # Methods without them have none, so nothing of theirs is planned anew.
    kvzap = validate_config(with_kvpress_task(kvzap={"thresholds": [-5]}))["methods"]["kvzap"]
    assert kvzap["canonical_ratios"] == [] and "compression_ratios" not in kvzap


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ({"h2o": {"compression_ratios": [1]}}, "methods.h2o.compression_ratios[0]: 1 is not a compression ratio in [0, 1)"),
        ({"h2o": {"compression_ratios": [-0.1]}}, "is not a compression ratio in [0, 1)"),
        ({"h2o": {"compression_ratios": ["half"]}}, "'half' is not a compression ratio"),
        ({"h2o": {"compression_ratios": [0.5, "5e-1"]}}, "methods.h2o.compression_ratios lists 0.5 twice"),
        ({"streaming_llm": {"compression_ratios": [0.5], "adaptive": True}}, "('adaptive' was unexpected)"),
        ({"h2o": {"compression_ratios": []}}, "methods.h2o.compression_ratios"),
    ],
)  # fmt: skip
def test_bad_compression_ratios_name_the_key(methods, message):
    config = with_kvpress_task(**methods)
    with pytest.raises(KvsweepError) as err:
        validate_config(config)
    assert message in str(err.value)


def test_compression_ratios_without_a_kvpress_protocol_task_are_named_as_unused():
    from kvsweep.study.config import unused_compression_ratios

    config = with_kvpress_task(h2o={"compression_ratios": [0.5]}, knorm={"thresholds": [-3]})
    assert unused_compression_ratios(validate_config(copy.deepcopy(config))) == []
    config["tasks"] = ["perplexity", "summarization"]
    assert unused_compression_ratios(validate_config(config)) == ["h2o"]


def test_a_task_compressing_while_decoding_evaluates_no_compression_ratio():
    """A compression ratio compresses the context once: summarization_kvpress with decoding: true
    leaves the ratios to perplexity_kvpress, or to no task at all (both said when planning)."""
    from kvsweep.study.config import ratio_tasks, tasks_without_ratios, unused_compression_ratios

    config = with_kvpress_task(knorm={"compression_ratios": [0.5]})
    config["summarization_kvpress"] = {"decoding": True}
    alone = validate_config(copy.deepcopy(config))
    assert ratio_tasks(alone) == [] and unused_compression_ratios(alone) == ["knorm"]
    assert tasks_without_ratios(alone) == ["summarization_kvpress"]
    config["tasks"].append("perplexity_kvpress")
    beside = validate_config(config)
    assert ratio_tasks(beside) == ["perplexity_kvpress"] and unused_compression_ratios(beside) == []
    assert tasks_without_ratios(beside) == ["summarization_kvpress"]
    without = validate_config(with_kvpress_task(knorm={"thresholds": [-3]}, kvzap={"thresholds": [-5]}))
    assert tasks_without_ratios(without) == [] and ratio_tasks(without) == ["summarization_kvpress"]


@pytest.mark.parametrize(
    ("method", "block", "message"),
    [
        ("snapkv", {"thresholds": [0.1]}, "('thresholds' was unexpected) (allowed keys: adaptive, adaptive_safeguard, compression_ratios, kernel_size, type, window_size)"),
        ("snapkv", {"target_densities": [0.5], "compression_ratios": [0.5]}, "('target_densities' was unexpected)"),
        ("snapkv", {"window_size": 8}, "'snapkv' needs compression_ratios (its score exists in kvpress's protocol only)"),
        ("snapkv", {"compression_ratios": [0.5], "kernel_size": 4}, "methods.snapkv.kernel_size"),
        ("snapkv", {"compression_ratios": [0.5], "window_size": 1024}, "methods.snapkv.window_size (1024): the shortest context"),
        ("kvzip", {"thresholds": [0.1]}, "('thresholds' was unexpected) (allowed keys: compression_ratios, kvzip_plus, layerwise, repeat_chunk, sinks, type)"),
        ("kvzip", {"compression_ratios": [0.5], "adaptive": True}, "('adaptive' was unexpected)"),
        ("kvzip", {"layerwise": True}, "'kvzip' needs compression_ratios (its score exists in kvpress's protocol only)"),
        ("kvzip", {"compression_ratios": [0.5], "repeat_chunk": 0}, "methods.kvzip.repeat_chunk"),
    ],
)  # fmt: skip
def test_methods_at_compression_ratios_only_refuse_anything_else(method, block, message):
    with pytest.raises(KvsweepError) as err:
        validate_config(with_kvpress_task(**{method: block}))
    assert message in str(err.value)


def test_methods_at_compression_ratios_only_take_them_with_their_settings():
    snapkv = validate_config(with_kvpress_task(snapkv={"compression_ratios": [0.5]}))["methods"]["snapkv"]
    assert snapkv["canonical_ratios"] == ["0.5"] and snapkv["window_size"] == 64
    kvzip = validate_config(with_kvpress_task(kvzip={"compression_ratios": [0.5], "layerwise": True}))["methods"]
    assert kvzip["kvzip"]["canonical_ratios"] == ["0.5"] and kvzip["kvzip"]["layerwise"] is True
    assert kvzip["kvzip"]["kvzip_plus"] is True


def test_streaming_llm_takes_compression_ratios_beside_or_instead_of_its_windows():
    config = validate_config(with_kvpress_task(streaming_llm={"compression_ratios": [0.5]}))
    block = config["methods"]["streaming_llm"]
    assert block["canonical_ratios"] == ["0.5"] and block["canonical_values"] == []
    both = {"sliding_windows": [64], "compression_ratios": ["5e-1", 0.75]}
    block = validate_config(with_kvpress_task(streaming_llm=both))["methods"]["streaming_llm"]
    assert block["canonical_ratios"] == ["0.5", "0.75"] and block["canonical_values"] == ["64"]


def test_adaptive_budgets_are_adakv_at_the_compression_ratios():
    from kvsweep.study.config import adaptive_safeguard

    config = validate_config(with_kvpress_task(
        knorm={"compression_ratios": [0.5]},
        knorm_ada={"type": "knorm", "compression_ratios": [0.5], "adaptive": True},
        h2o_ada={"type": "h2o", "compression_ratios": [0.5], "adaptive": True, "adaptive_safeguard": 0.5},
    ))  # fmt: skip
    assert [adaptive_safeguard(config, name) for name in ("knorm", "knorm_ada", "h2o_ada")] == [None, 0.2, 0.5]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"thresholds": [-3], "adaptive": True}, "methods.knorm.adaptive: AdaKV shares a compression ratio's budget"),
        ({"compression_ratios": [0.5], "adaptive_safeguard": 0.3}, "methods.knorm.adaptive_safeguard: only with adaptive: true"),
        ({"compression_ratios": [0.5], "adaptive": True, "adaptive_safeguard": 1.5}, "methods.knorm.adaptive_safeguard"),
        ({"compression_ratios": [0.5], "adaptive": "yes"}, "methods.knorm.adaptive"),
    ],
)  # fmt: skip
def test_bad_adaptive_budgets_name_the_key(block, message):
    with pytest.raises(KvsweepError) as err:
        validate_config(with_kvpress_task(knorm=block))
    assert message in str(err.value)
