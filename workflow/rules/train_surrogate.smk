# A KVzap surrogate for any model (model.kvzap_surrogate: train): the documents after the
# calibration's (never evaluated or calibrated on), their KVzip+ targets from the model itself,
# a linear or MLP surrogate fitted to them, and its validation record on held-out documents. Every
# job that runs KVzap waits for it; no other job does. Preparing and checking the documents are
# light steps (run where Snakemake runs); the training is submitted like the evaluation jobs.


localrules:
    prepare_surrogate,


rule prepare_surrogate:
    input:
        source=lambda wildcards: source_input(
            f"{SURROGATE_DATA}/perplexity/documents.jsonl",
            config["surrogate"]["documents"] + config["surrogate"]["validation_documents"],
        ),
        tokenizer=local_input(config["model"]["name"]),
    output:
        shard=f"{SURROGATE_DATA}/perplexity/shard000.jsonl",
        documents=f"{SURROGATE_DATA}/perplexity/documents.jsonl",
    params:
        args=lambda wildcards: surrogate_prepare_arguments(),
        output_dir=lambda wildcards, output: str(Path(output.documents).parent.parent),
    log:
        f"{RESULTS}/logs/kvzap_surrogate/prepare.log",
    benchmark:
        f"{RESULTS}/benchmarks/kvzap_surrogate/prepare.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep prepare {params.args:q} --output-dir={params.output_dir:q} 2> {log:q}"


if SURROGATE_TO_TRAIN:

    rule train_surrogate:
        input:
            data=f"{SURROGATE_DATA}/perplexity/shard000.jsonl",
            model=local_input(config["model"]["name"]),
        output:
            directory(SURROGATE_TO_TRAIN),
        params:
            args=lambda wildcards: surrogate_training_arguments(),
        resources:
            **model_job_resources(speed=False),
        log:
            f"{RESULTS}/logs/kvzap_surrogate/train.log",
        benchmark:
            f"{RESULTS}/benchmarks/kvzap_surrogate/train.tsv"
        conda:
            "../../envs/kvsweep.yaml"
        shell:
            "python -m kvsweep train_surrogate {params.args:q} --data={input.data:q} --output={output:q} 2> {log:q}"

    localrules:
        check_surrogate_documents,

    # The surrogate's documents against the study's and the calibration's: disjoint by construction
    # (they follow them), checked by a job of its own that nothing waits for, so that adding
    # documents or a task (which rewrites those lists) never retrains the surrogate.
    rule check_surrogate_documents:
        input:
            documents=f"{SURROGATE_DATA}/perplexity/documents.jsonl",
            exclude=surrogate_exclusions(),
        output:
            f"{RESULTS}/kvzap_surrogate/documents_check.txt",
        log:
            f"{RESULTS}/logs/kvzap_surrogate/check_documents.log",
        benchmark:
            f"{RESULTS}/benchmarks/kvzap_surrogate/check_documents.tsv"
        conda:
            "../../envs/kvsweep.yaml"
        shell:
            "python -m kvsweep check_surrogate_documents --documents={input.documents:q} --exclude {input.exclude:q} "
            "--output={output:q} 2> {log:q}"
