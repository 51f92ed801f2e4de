# Load the documents, tokenize with the model's tokenizer, truncate, skip short ones, and write one
# task's shard (summarization: LongBench's prompt and the reference summaries). One job per (task,
# shard), with only that task's settings and only what the shard depends on: adding a task, or
# editing summarization's reference field, reruns nothing of the other task, and adding documents
# leaves full shards (and their evaluation jobs) as they were.


rule prepare:
    input:
        source=lambda wildcards: source_input(
            f"{RESULTS}/data/{wildcards.task}/shard{wildcards.shard}.documents.jsonl", shard_documents(int(wildcards.shard))
        ),
        tokenizer=local_input(config["model"]["name"]),
    output:
        shard=f"{RESULTS}/data/{{task}}/shard{{shard}}.jsonl",
        documents=f"{RESULTS}/data/{{task}}/shard{{shard}}.documents.jsonl",
    params:
        args=lambda wildcards: prepare_arguments(wildcards.task, int(wildcards.shard)),
        output_dir=lambda wildcards, output: str(Path(output.documents).parent.parent),
    log:
        f"{RESULTS}/logs/prepare_{{task}}_shard{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_{{task}}_shard{{shard}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep prepare {params.args:q} --output-dir={params.output_dir:q} 2> {log:q}"


# Every document of a task, in shard order: what the study reads (id, source index, tokens, truncated).
rule document_list:
    input:
        expand(f"{RESULTS}/data/{{{{task}}}}/shard{{shard}}.documents.jsonl", shard=SHARDS),
    output:
        f"{RESULTS}/data/{{task}}/documents.jsonl",
    log:
        f"{RESULTS}/logs/document_list_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/document_list_{{task}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "cat {input:q} > {output:q}.tmp 2> {log:q} && mv {output:q}.tmp {output:q}"
