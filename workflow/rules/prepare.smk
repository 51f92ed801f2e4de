# Load the documents, tokenize with the model's tokenizer, truncate, skip short ones, and write each
# task's shards (summarization: LongBench's prompt and the reference summaries).


rule prepare:
    input:
        local_input(config["dataset"]["source"]),
        local_input(config["model"]["name"]),
    output:
        shards=expand(f"{RESULTS}/data/{{task}}/shard{{shard}}.jsonl", task=config["tasks"], shard=SHARDS),
        documents=f"{RESULTS}/data/documents.jsonl",
    params:
        source=config["dataset"]["source"],
        split=config["dataset"]["split"],
        text_field=config["dataset"]["text_field"],
        summary_field=config["dataset"]["summary_field"],
        tasks=" ".join(config["tasks"]),
        id_field=f"--id-field={config['dataset']['id_field']}" if config["dataset"]["id_field"] else "",
        subset=f"--subset={config['dataset']['subset']}" if config["dataset"]["subset"] else "",
        tokenizer=config["model"]["name"],
        max_documents=config["dataset"]["max_documents"],
        max_length=config["dataset"]["max_length"],
        min_length=config["dataset"]["min_length"],
        shard_size=config["dataset"]["shard_size"],
        output_dir=lambda wildcards, output: os.path.dirname(output.documents),
    log:
        f"{RESULTS}/logs/prepare.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.prepare --source={params.source} --split={params.split} {params.subset} "
        "--text-field={params.text_field} --summary-field={params.summary_field} {params.id_field} "
        "--tokenizer={params.tokenizer} --tasks {params.tasks} "
        "--max-documents={params.max_documents} --max-length={params.max_length} "
        "--min-length={params.min_length} --shard-size={params.shard_size} "
        "--output-dir={params.output_dir} 2> {log}"
