# Per task and (method, swept value): quality (perplexity, or ROUGE), KV densities, and the paired
# difference to baseline with a bootstrap CI, as CSV and Markdown; what each configuration was
# computed with (provenance.csv); where the model jobs' time went (job_costs.{csv,md}, from each
# job's stage record).


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
        "python -m kvsweep score --task={wildcards.task:q} --inputs {input.explicit:q} {input.calibrated:q} "
        "--documents {input.documents:q} --calibrations {input.calibrations:q} --output-csv={output.csv:q} --output-md={output.md:q} "
        "--output-provenance={output.provenance:q} --output-costs={output.costs:q} --output-costs-md={output.costs_md:q} {params.bootstrap:q} {params.training:q} --swept {params.swept:q} > {log:q} 2>&1"
