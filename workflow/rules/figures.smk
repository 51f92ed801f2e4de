# The H2O-versus-KVzap figure of each task: quality against KV density, one curve per method.


rule figures:
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
        f"{RESULTS}/logs/figures_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/compare_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep figures --summary={input.summary:q} --comparison={input.comparison:q} "
        "--task={wildcards.task:q} {params.density:q} --title={params.title:q} "
        "--output-png={output.png:q} --output-pdf={output.pdf:q} 2> {log:q}"
