#!/usr/bin/env bash
# The workflow's own jobs on a split model: the demo's model (2 layers, so 1 per GPU), shards and
# surrogate, run by the same commands the workflow runs, on one GPU and split over two, in bf16.
# Needs the demo's files (`snakemake --configfile demo/config.yaml --cores 2
# results/demo/data/perplexity/shard000.jsonl results/demo/data/summarization/shard000.jsonl
# results/demo/kvzap_surrogate/mlp`) and 2 GPUs. Writes compare_job_outputs.py's report to $1.
set -euo pipefail
REPORT=${1:?report path}
WORK=${WORK:-/tmp/kvsweep_jobs}
DEMO=results/demo
MODEL=$DEMO/demo_assets/model
rm -rf "$WORK"
declare -A METHOD=(
  [baseline]="--method=baseline"
  [h2o]="--method=h2o --threshold=0.005 --local-window=32 --sinks=0"
  [kvzap]="--method=kvzap --threshold=0 --sliding-window=32 --sinks=4 --kvzap-surrogate=$DEMO/kvzap_surrogate/mlp --kvzap-type=mlp"
  [random]="--method=random --threshold=0.4 --sliding-window=32 --sinks=4 --seed=42"
  [expected_attention]="--method=expected_attention --threshold=0.002 --sliding-window=32 --sinks=4"
)
for gpus in 1 2; do
  for task in perplexity summarization; do
    extra=""; [ "$task" = summarization ] && extra="--max-new-tokens=48"
    for method in baseline h2o kvzap random expected_attention; do
      mkdir -p "$WORK/gpus$gpus/$task"
      # Two GPUs through the workflow's variable, as a job of the workflow gets them.
      KVSWEEP_GPUS_PER_JOB=$gpus python -m kvsweep evaluate --model=$MODEL --dtype=bfloat16 --device=cuda \
        --chunk-size=16 --max-length=512 --batch-size=4 --cuda-graphs=auto --task=$task $extra \
        --data=$DEMO/data/$task/shard000.jsonl ${METHOD[$method]} \
        --output="$WORK/gpus$gpus/$task/$method.jsonl" 2> "$WORK/gpus$gpus/$task/$method.log"
    done
  done
  python -m kvsweep train_surrogate --model=$MODEL --dtype=bfloat16 --device=cuda --gpus=$gpus --kvzap-type=mlp \
    --validation-documents=4 --tokens-per-document=256 --hidden-dim=64 --epochs=30 --learning-rate=0.005 \
    --batch-size=512 --seed=0 --data=$DEMO/kvzap_surrogate/data/perplexity/shard000.jsonl \
    --output="$WORK/gpus$gpus/surrogate" 2> "$WORK/gpus$gpus/surrogate.log"
done
# Refusal: a split over more GPUs than the job sees (more GPUs than layers is tested on the CPU).
set +e
CUDA_VISIBLE_DEVICES=0 python -m kvsweep evaluate --model=$MODEL --device=cuda --gpus=2 --chunk-size=16 --max-length=512 \
  --data=$DEMO/data/perplexity/shard000.jsonl --method=baseline --output="$WORK/refused.jsonl" 2> "$WORK/too_few_visible.txt"
set -e
python benchmarks/compare_job_outputs.py "$WORK" "$REPORT"
