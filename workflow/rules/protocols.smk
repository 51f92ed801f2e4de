# A task measured under both protocols (`perplexity` and `perplexity_kvpress`, or the two
# summarizations): their summaries side by side, protocols/<task>.{csv,md} and a figure.


rule protocols:
    input:
        streaming=f"{RESULTS}/{{task}}/summary.csv",
        kvpress=f"{RESULTS}/{{task}}_kvpress/summary.csv",
    output:
        csv=report(
            f"{RESULTS}/protocols/{{task}}.csv",
            caption="../report/protocols.rst",
            category="protocols",
            labels={"table": "{task}: streaming against kvpress's protocol"},
        ),
        md=f"{RESULTS}/protocols/{{task}}.md",
        png=report(
            f"{RESULTS}/protocols/{{task}}.png",
            caption="../report/protocols.rst",
            category="protocols",
            labels={"figure": "{task}: streaming against kvpress's protocol"},
        ),
        pdf=f"{RESULTS}/protocols/{{task}}.pdf",
    wildcard_constraints:
        task="perplexity|summarization",
    params:
        density=options(density=config["comparison"]["density"]),
    log:
        f"{RESULTS}/logs/protocols_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/protocols_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep protocols --task={wildcards.task:q} --streaming={input.streaming:q} "
        "--kvpress={input.kvpress:q} {params.density:q} --output-csv={output.csv:q} --output-md={output.md:q} "
        "--output-png={output.png:q} --output-pdf={output.pdf:q} > {log:q} 2>&1"
