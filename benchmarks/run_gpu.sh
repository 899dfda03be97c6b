#!/usr/bin/env bash
# How the numbers in BENCHMARKS.md were taken on a lent GPU machine (see ../shared/DEVICE.md for
# getting the SmolLM2 GGUF there as /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf and WikiText into .data/).
#   bash benchmarks/run_gpu.sh bench     # evaluation, training and pruning speed
#   bash benchmarks/run_gpu.sh quality   # SmolLM2 pruning table
#   bash benchmarks/run_gpu.sh recover   # SmolLM2 main job at density 1.0, 0.5, 0.1 (DENSITIES="0.1" for one)
#   bash benchmarks/run_gpu.sh multi     # the same main job on 1 GPU and on 2 (--parallel fsdp, ddp)
set -u
GGUF=${GGUF:-/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-.data}
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
main_job() {  # $1 density, $2 output dir, rest: extra flags
  local density=$1 out=$2; shift 2
  python3 extreme_compression_experiment.py --model "$GGUF" --sparsity "$density" --batch-size 8 --epochs 2 \
    --train-source "$DATA/wiki.valid.raw" --eval-source "$DATA" --calibration-source "$DATA/wiki.valid.raw" \
    --eval-batch-size 8 --output-dir "$out" "$@"
}
case "${1:-bench}" in
  bench)
    python3 benchmarks/bench_eval.py 2>&1 | tee "$OUT/bench_eval.log"
    python3 benchmarks/bench_train.py --smollm2 "$GGUF" 2>&1 | tee "$OUT/bench_train.log"
    python3 benchmarks/bench_prune.py --smollm2 "$GGUF" --data "$DATA" --opt 2>&1 | tee "$OUT/bench_prune.log" ;;
  quality)
    python3 benchmarks/bench_prune.py --smollm2 "$GGUF" --data "$DATA" --quality 2>&1 | tee "$OUT/quality.log" ;;
  recover)
    for density in ${DENSITIES:-1.0 0.5 0.1}; do
      main_job "$density" "runs/smollm2-$density" "${@:2}" 2>&1 | tee "$OUT/recover-$density.log"
    done ;;
  multi)
    CUDA_VISIBLE_DEVICES=0 main_job 0.5 runs/one-gpu --epochs 1 "${@:2}" 2>&1 | tee "$OUT/one-gpu.log"
    for parallel in ${PARALLEL:-fsdp ddp}; do  # compare the epoch events' steady_tokens_per_second
      accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        extreme_compression_experiment.py --model "$GGUF" --sparsity 0.5 --batch-size 8 --epochs 1 \
        --train-source "$DATA/wiki.valid.raw" --eval-source "$DATA" --calibration-source "$DATA/wiki.valid.raw" \
        --eval-batch-size 8 --parallel "$parallel" --output-dir "runs/two-gpu-$parallel" "${@:2}" 2>&1 \
        | tee "$OUT/two-gpu-$parallel.log"
    done ;;
esac
