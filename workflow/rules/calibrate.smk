# Target densities: the threshold at which each method keeps a given share of the compressible KV
# cache, found on calibration documents that the study never evaluates (the next ones after the
# study's that pass the same filters), with the study's own engine, model, chunk size and windows.
# One probe per method (score quantiles of a run that evicts nothing), then one search per
# (method, target). The search is a checkpoint: its threshold names the evaluation jobs.


rule prepare_calibration:
    input:
        source=lambda wildcards: source_input(f"{CALIBRATION_DATA}/documents.jsonl", config["calibration"]["documents"]),
        tokenizer=local_input(config["model"]["name"]),
    output:
        shard=f"{CALIBRATION_DATA}/shard000.jsonl",
        documents=f"{CALIBRATION_DATA}/documents.jsonl",
    params:
        args=lambda wildcards: calibration_prepare_arguments(),
        output_dir=lambda wildcards, output: str(Path(output.documents).parent.parent),
    log:
        f"{RESULTS}/logs/calibration/prepare.log",
    benchmark:
        f"{RESULTS}/benchmarks/calibration/prepare.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep prepare {params.args:q} --output-dir={params.output_dir:q} 2> {log:q}"


rule calibration_probe:
    input:
        shard=f"{CALIBRATION_DATA}/shard000.jsonl",
        model=local_input(config["model"]["name"]),
        surrogate=surrogate_input,
    output:
        f"{RESULTS}/calibration/{{method}}/probe.json",
    params:
        engine=lambda wildcards: engine_arguments(),
        method=lambda wildcards: method_arguments(wildcards.method, "none"),
    resources:
        **model_job_resources(),
    log:
        f"{RESULTS}/logs/calibration/{{method}}/probe.log",
    benchmark:
        f"{RESULTS}/benchmarks/calibration/{{method}}/probe.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep calibrate probe {params.engine:q} --batch-size={resources.batch_size:q} "
        "--cuda-graphs={resources.cuda_graphs:q} --data={input.shard:q} --method={wildcards.method:q} "
        "{params.method:q} --output={output:q} 2> {log:q}"


checkpoint calibrate:
    input:
        shard=f"{CALIBRATION_DATA}/shard000.jsonl",
        probe=f"{RESULTS}/calibration/{{method}}/probe.json",
        model=local_input(config["model"]["name"]),
        surrogate=surrogate_input,
    output:
        f"{RESULTS}/calibration/{{method}}/{{target}}.json",
    params:
        engine=lambda wildcards: engine_arguments(),
        method=lambda wildcards: method_arguments(wildcards.method, "none"),
        search=lambda wildcards: calibration_search_arguments(wildcards.target),
    resources:
        **model_job_resources(),
    log:
        f"{RESULTS}/logs/calibration/{{method}}/{{target}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/calibration/{{method}}/{{target}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep calibrate search {params.engine:q} --batch-size={resources.batch_size:q} "
        "--cuda-graphs={resources.cuda_graphs:q} --data={input.shard:q} --method={wildcards.method:q} "
        "{params.method:q} --probe={input.probe:q} {params.search:q} --output={output:q} 2> {log:q}"
