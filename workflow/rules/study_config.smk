# The study's own config, with every default filled in, for `snakemake --report` (Snakemake's
# report lists no config file by itself): the numbers and the settings they came from, on one page.


rule study_config:
    output:
        report(f"{RESULTS}/config.yaml", caption="../report/config.rst", category="configuration"),
    params:
        config=lambda wildcards: reported_config(),
    log:
        f"{RESULTS}/logs/study_config.log",
    run:
        from kvsweep.study.config import write_resolved

        write_resolved(params.config, output[0])
