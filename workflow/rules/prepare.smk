# Load the documents, tokenize with the model's tokenizer, truncate, skip short ones, and write one
# task's shards (summarization: LongBench's prompt and the reference summaries). One job per task,
# with only that task's settings: adding a task, or editing summarization's reference field,
# reruns nothing of the other task.


rule prepare:
    input:
        source=local_input(config["dataset"]["source"]),
        tokenizer=local_input(config["model"]["name"]),
    output:
        shards=expand(f"{RESULTS}/data/{{{{task}}}}/shard{{shard}}.jsonl", shard=SHARDS),
        documents=f"{RESULTS}/data/{{task}}/documents.jsonl",
    params:
        args=lambda wildcards: prepare_arguments(wildcards.task),
        output_dir=lambda wildcards, output: str(Path(output.documents).parent.parent),
    log:
        f"{RESULTS}/logs/prepare_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.prepare {params.args:q} --output-dir={params.output_dir:q} 2> {log:q}"
