# Every compressed method against every other at equal KV density, with paired bootstrap
# intervals: comparison.csv, comparison_auc.csv, comparison.md.


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
        "python -m kvsweep comparison --task={wildcards.task:q} --inputs {input.explicit:q} {input.calibrated:q} "
        "--documents {input.documents:q} --calibrations {input.calibrations:q} {params.comparison:q} --grid {params.grid:q} "
        "--length-buckets {params.buckets:q} --output-csv={output.csv:q} --output-auc-csv={output.auc:q} "
        "--output-md={output.md:q} {params.bootstrap:q} > {log:q} 2>&1"
