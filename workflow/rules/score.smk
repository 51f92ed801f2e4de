# Per task and (method, threshold): quality (perplexity, or ROUGE), KV densities, and the paired
# difference to baseline with a bootstrap CI, as CSV and Markdown.


rule score:
    input:
        lambda wildcards: evaluation_outputs(wildcards.task),
    output:
        csv=f"{RESULTS}/{{task}}/summary.csv",
        md=f"{RESULTS}/{{task}}/summary.md",
    params:
        n_resamples=config["bootstrap"]["n_resamples"],
        confidence=config["bootstrap"]["confidence"],
        seed=config["bootstrap"]["seed"],
    log:
        f"{RESULTS}/logs/score_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/score_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.score --task={wildcards.task} --inputs {input} --output-csv={output.csv} --output-md={output.md} "
        "--n-resamples={params.n_resamples} --confidence={params.confidence} --seed={params.seed} > {log} 2>&1"
