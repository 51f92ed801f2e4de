# Where each compressed method evicts: one document, per layer, the share of KV heads keeping
# each position, at the method's middle explicit value (or its middle target's threshold).


rule eviction_map:
    input:
        shard=f"{RESULTS}/data/{config['tasks'][0]}/shard{SHARDS[0]}.jsonl",
        model=local_input(config["model"]["name"]),
        surrogate=surrogate_input,
        calibration=lambda wildcards: eviction_map_calibration(wildcards.method),
    output:
        png=report(
            f"{RESULTS}/figures/eviction_map_{{method}}.png",
            caption="../report/eviction_map.rst",
            category="eviction maps",
            labels={"method": "{method}"},
        ),
        pdf=f"{RESULTS}/figures/eviction_map_{{method}}.pdf",
    params:
        engine=lambda wildcards: engine_arguments(),
        method=lambda wildcards: eviction_map_arguments(wildcards.method),
    resources:
        **model_job_resources(),
    log:
        f"{RESULTS}/logs/eviction_map_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eviction_map_{{method}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep eviction_map {params.engine:q} --cuda-graphs={resources.cuda_graphs:q} "
        "--data={input.shard:q} --method={wildcards.method:q} "
        "{params.method:q} --output-png={output.png:q} --output-pdf={output.pdf:q} 2> {log:q}"
