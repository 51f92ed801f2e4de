# One job per (task, method, value, shard): streaming perplexity, or summarization (the report
# streamed into the cache, then greedy generation), under eviction. The swept value (a threshold,
# or streaming_llm's window) is in the path in canonical form, and each job's params hold only its
# own method's settings, so an edit of config.yaml reruns exactly the jobs it changes.


rule evaluate:
    input:
        shard=f"{RESULTS}/data/{{task}}/shard{{shard}}.jsonl",
        model=local_input(config["model"]["name"]),
        surrogate=surrogate_input,
    output:
        f"{RESULTS}/{{task}}/{{method}}/{{value}}/shard{{shard}}.jsonl",
    params:
        engine=lambda wildcards: engine_arguments(wildcards.task),
        task=lambda wildcards: task_arguments(wildcards.task),
        method=lambda wildcards: method_arguments(wildcards.method, wildcards.value),
    resources:
        **model_job_resources(),
    log:
        f"{RESULTS}/logs/{{task}}/{{method}}/{{value}}/shard{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{task}}/{{method}}/{{value}}/shard{{shard}}.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep evaluate {params.engine:q} --batch-size={resources.batch_size:q} "
        "--cuda-graphs={resources.cuda_graphs:q} --prefill-batch-size={resources.prefill_batch_size:q} "
        "{params.task:q} --data={input.shard:q} "
        "--method={wildcards.method:q} {params.method:q} --output={output:q} 2> {log:q}"
