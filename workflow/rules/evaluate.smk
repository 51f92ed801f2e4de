# One job per (method, threshold, shard): streaming perplexity under eviction. The threshold is in
# the path in canonical form, and each job's params hold only its own method's settings, so an
# edit of config.yaml reruns exactly the jobs it changes.


rule evaluate:
    input:
        shard=f"{RESULTS}/data/shard{{shard}}.jsonl",
        model=local_input(config["model"]["name"]),
        surrogate=local_input(config["model"]["kvzap_surrogate"]),
    output:
        f"{RESULTS}/perplexity/{{method}}/{{threshold}}/shard{{shard}}.jsonl",
    params:
        engine=engine_arguments(),
        method=lambda wildcards: method_arguments(wildcards.method, wildcards.threshold),
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
        **gpu_resources(),
    log:
        f"{RESULTS}/logs/perplexity/{{method}}/{{threshold}}/shard{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/perplexity/{{method}}/{{threshold}}/shard{{shard}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.evaluate {params.engine} --data={input.shard} --method={wildcards.method} "
        "{params.method} --output={output} 2> {log}"
