# The CPU demo's assets: generated reports, and a copy of the tiny model bundled with kvsweep (with
# its tokenizer; src/kvsweep/demo/model.py says why it is bundled rather than trained here). Its KVzap
# surrogate is trained by train_surrogate, as a study's would be.
# Runs only when the config names these paths (demo/config.yaml does).


rule demo_assets:
    output:
        model=directory(f"{DEMO_ASSETS}/model"),
        data=f"{DEMO_ASSETS}/govreport.jsonl",
    params:
        documents=48,
        output_dir=lambda wildcards, output: os.path.dirname(output.data),
    log:
        f"{RESULTS}/logs/demo_assets.log",
    benchmark:
        f"{RESULTS}/benchmarks/demo_assets.tsv"
    conda:
        "../../envs/kvsweep.yaml"
    shell:
        "python -m kvsweep demo_assets --output-dir={params.output_dir:q} --documents={params.documents} 2> {log:q}"
