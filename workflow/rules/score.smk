# Per (method, threshold): perplexity, KV densities, paired NLL difference to baseline with a
# bootstrap CI, as CSV and Markdown.


rule score_perplexity:
    input:
        evaluation_outputs("perplexity"),
    output:
        csv=f"{RESULTS}/perplexity/summary.csv",
        md=f"{RESULTS}/perplexity/summary.md",
    params:
        n_resamples=config["bootstrap"]["n_resamples"],
        confidence=config["bootstrap"]["confidence"],
        seed=config["bootstrap"]["seed"],
    log:
        f"{RESULTS}/logs/score_perplexity.log",
    benchmark:
        f"{RESULTS}/benchmarks/score_perplexity.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.score --inputs {input} --output-csv={output.csv} --output-md={output.md} "
        "--n-resamples={params.n_resamples} --confidence={params.confidence} --seed={params.seed} > {log} 2>&1"
