# The H2O-versus-KVzap figures: quality against KV density, and where each method evicts.


rule compare:
    input:
        summary=f"{RESULTS}/{{task}}/summary.csv",
        comparison=f"{RESULTS}/{{task}}/comparison.csv",
    output:
        png=report(
            f"{RESULTS}/{{task}}/figures/quality_vs_density.png",
            caption="../report/quality_vs_density.rst",
            category="{task}",
            labels={"figure": "quality against KV density"},
        ),
        pdf=f"{RESULTS}/{{task}}/figures/quality_vs_density.pdf",
    params:
        title=lambda wildcards: f"{config['run']}: {wildcards.task} under KV eviction",
        density=options(density=config["comparison"]["density"]),
    log:
        f"{RESULTS}/logs/compare_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/compare_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.compare --summary={input.summary:q} --comparison={input.comparison:q} "
        "--task={wildcards.task:q} {params.density:q} --title={params.title:q} "
        "--output-png={output.png:q} --output-pdf={output.pdf:q} 2> {log:q}"


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
        "python -m kvsweep.eviction_map {params.engine:q} --cuda-graphs={resources.cuda_graphs:q} "
        "--data={input.shard:q} --method={wildcards.method:q} "
        "{params.method:q} --output-png={output.png:q} --output-pdf={output.pdf:q} 2> {log:q}"
