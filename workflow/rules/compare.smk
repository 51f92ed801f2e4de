# The H2O-versus-KVzap figures: quality against KV density, and where each method evicts.


rule compare:
    input:
        f"{RESULTS}/{{task}}/summary.csv",
    output:
        png=f"{RESULTS}/{{task}}/figures/quality_vs_density.png",
        pdf=f"{RESULTS}/{{task}}/figures/quality_vs_density.pdf",
    params:
        title=lambda wildcards: f"{config['run']}: {wildcards.task} under KV eviction",
    log:
        f"{RESULTS}/logs/compare_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/compare_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.compare --summary={input} --task={wildcards.task} --title='{params.title}' "
        "--output-png={output.png} --output-pdf={output.pdf} 2> {log}"


rule eviction_map:
    input:
        shard=f"{RESULTS}/data/{config['tasks'][0]}/shard{SHARDS[0]}.jsonl",
        model=local_input(config["model"]["name"]),
        surrogate=local_input(config["model"]["kvzap_surrogate"]),
    output:
        png=f"{RESULTS}/figures/eviction_map_{{method}}.png",
        pdf=f"{RESULTS}/figures/eviction_map_{{method}}.pdf",
    params:
        engine=engine_arguments(),
        method=lambda wildcards: method_arguments(wildcards.method, middle_threshold(wildcards.method)),
    resources:
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
        **gpu_resources(),
        **speed_resources(),
    log:
        f"{RESULTS}/logs/eviction_map_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eviction_map_{{method}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.eviction_map {params.engine} --cuda-graphs={resources.cuda_graphs} "
        "--data={input.shard} --method={wildcards.method} "
        "{params.method} --output-png={output.png} --output-pdf={output.pdf} 2> {log}"
