# Per task and (method, swept value): quality (perplexity, or ROUGE), KV densities, and the paired
# difference to baseline with a bootstrap CI, as CSV and Markdown; where the evaluation jobs' time
# went (job_costs.{csv,md}, from each job's stage record); then every compressed method
# against every other at equal KV density (comparison.csv, comparison_auc.csv, comparison.md).


rule score:
    input:
        **scored_inputs(),
    output:
        csv=report(
            f"{RESULTS}/{{task}}/summary.csv",
            caption="../report/summary.rst",
            category="{task}",
            labels={"table": "quality per method and threshold"},
        ),
        md=f"{RESULTS}/{{task}}/summary.md",
        provenance=report(
            f"{RESULTS}/{{task}}/provenance.csv",
            caption="../report/provenance.rst",
            category="provenance",
            labels={"task": "{task}"},
        ),
        costs=report(
            f"{RESULTS}/{{task}}/job_costs.csv",
            caption="../report/job_costs.rst",
            category="provenance",
            labels={"table": "evaluation jobs' time per stage ({task})"},
        ),
        costs_md=f"{RESULTS}/{{task}}/job_costs.md",
    params:
        bootstrap=options(**config["bootstrap"]),
        swept=swept_arguments(),
        training=options(surrogate_training=TRAINED_SURROGATE),
    log:
        f"{RESULTS}/logs/score_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/score_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.score --task={wildcards.task:q} --inputs {input.explicit:q} {input.calibrated:q} "
        "--documents {input.documents:q} --calibrations {input.calibrations:q} --output-csv={output.csv:q} --output-md={output.md:q} "
        "--output-provenance={output.provenance:q} --output-costs={output.costs:q} --output-costs-md={output.costs_md:q} {params.bootstrap:q} {params.training:q} --swept {params.swept:q} > {log:q} 2>&1"


rule comparison:
    input:
        **scored_inputs(),
    output:
        csv=report(
            f"{RESULTS}/{{task}}/comparison.csv",
            caption="../report/comparison.rst",
            category="{task}",
            labels={"table": "method against method"},
        ),
        auc=report(
            f"{RESULTS}/{{task}}/comparison_auc.csv",
            caption="../report/comparison_auc.rst",
            category="{task}",
            labels={"table": "area under the loss curve"},
        ),
        md=f"{RESULTS}/{{task}}/comparison.md",
    params:
        comparison=options(density=config["comparison"]["density"], tolerance=config["calibration"]["tolerance"]),
        grid=config["comparison"]["grid"],
        buckets=config["comparison"]["length_buckets"],
        bootstrap=options(**config["bootstrap"]),
    log:
        f"{RESULTS}/logs/comparison_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/comparison_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.comparison --task={wildcards.task:q} --inputs {input.explicit:q} {input.calibrated:q} "
        "--documents {input.documents:q} --calibrations {input.calibrations:q} {params.comparison:q} --grid {params.grid:q} "
        "--length-buckets {params.buckets:q} --output-csv={output.csv:q} --output-auc-csv={output.auc:q} "
        "--output-md={output.md:q} {params.bootstrap:q} > {log:q} 2>&1"
