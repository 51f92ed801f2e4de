# The H2O-versus-KVzap figures: quality against KV density, and where each method evicts.


rule compare_perplexity:
    input:
        f"{RESULTS}/perplexity/summary.csv",
    output:
        png=f"{RESULTS}/perplexity/figures/quality_vs_density.png",
        pdf=f"{RESULTS}/perplexity/figures/quality_vs_density.pdf",
    params:
        title=f"{config['run']}: streaming perplexity under KV eviction",
    log:
        f"{RESULTS}/logs/compare_perplexity.log",
    benchmark:
        f"{RESULTS}/benchmarks/compare_perplexity.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.compare --summary={input} --title='{params.title}' "
        "--output-png={output.png} --output-pdf={output.pdf} 2> {log}"


rule eviction_map:
    input:
        shard=f"{RESULTS}/data/shard{SHARDS[0]}.jsonl",
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
    log:
        f"{RESULTS}/logs/eviction_map_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eviction_map_{{method}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.eviction_map {params.engine} --data={input.shard} --method={wildcards.method} "
        "{params.method} --output-png={output.png} --output-pdf={output.pdf} 2> {log}"
