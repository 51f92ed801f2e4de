# The CPU demo's assets: generated reports and a tiny model trained on others, with its tokenizer
# (its KVzap surrogate is trained by train_surrogate, as a study's would be).
# Runs only when the config names these paths (demo/config.yaml does).


rule demo_assets:
    output:
        model=directory(f"{DEMO_ASSETS}/model"),
        data=f"{DEMO_ASSETS}/govreport.jsonl",
    params:
        documents=48,
        train_steps=600,
        output_dir=lambda wildcards, output: os.path.dirname(output.data),
    # Every other job waits for these assets: training may take the cores (scaled down to --cores).
    threads: 2
    log:
        f"{RESULTS}/logs/demo_assets.log",
    benchmark:
        f"{RESULTS}/benchmarks/demo_assets.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep.demo --output-dir={params.output_dir:q} --documents={params.documents} "
        "--train-steps={params.train_steps} 2> {log:q}"
