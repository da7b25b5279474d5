#!/usr/bin/env bash
# The two studies of docs/results.md (issue 10), on the real ImageNet EfficientNet-Lite0 weights and the
# scikit-learn digits, each as two shards in parallel (one per core, one torch thread each):
#   (a) blocks none / eca / se / se-var1 / se-var2 / se-var3 / se-gc × seeds 0,1,2 × --train full,blocks: 42 runs
#   (b) ECA placements standard / pre / post / identity × seeds 0,1,2 × --train full,blocks: 30 runs
# Recipe: 64-px inputs (as docs/results.md's hand-made comparison), 8 epochs, batch 32, AdamW lr 1e-3.
# Sizing (not yet measured as a whole): Lite0 at 64 px trains at ≈ 115 img/s on one thread of our 2-core VM
# (docs/benchmarks.md), ≈ 14 s per full-training epoch of 1,437 images with validation, less with the backbone
# frozen; (a) is 21 runs per shard, ≈ 21 × (8 × 12 s + 10 s) ≈ 40 min at that rate, (b) 15 runs per shard
# ≈ 27 min; expect up to an hour each on a loaded machine. Re-running the script resumes where it stopped.
# Outputs: runs/lite0-blocks/ablation.md and runs/lite0-placements/ablation.md (+ .csv, .json, .png).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data="${DATA:-data/digits}"
weights="${WEIGHTS:-lite0.safetensors}"
out="${OUT:-runs}"
[ -d "$data/train" ] || python scripts/make_digits.py "$data"
[ -f "$weights" ] || retrofit demo weights -o "$weights"

recipe=(tf_efficientnet_lite0 --weights "$weights" --data "$data" --img-size 64 --epochs 8 -b 32 --lr 1e-3
        --hflip 0 --scale 0.5,1 -j 0 --seeds 0,1,2 --train full,blocks)

study() {  # study OUTPUT AXES…: two shards in parallel, then the merged tables
  local folder=$1 status=0 pids=()
  shift
  for i in 1 2; do
    OMP_NUM_THREADS=1 retrofit ablate "${recipe[@]}" "$@" -o "$folder" --shard "$i/2" > "$folder.shard$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  retrofit ablate "${recipe[@]}" "$@" -o "$folder" --report-only || status=1
  return $status
}

mkdir -p "$out"
# se-gc: 8 groups divide every Lite0 residual width (24, 40, 80, 112, 192); the paper's 16 does not divide 24 or 40.
study "$out/lite0-blocks" --blocks none,eca,se,se-var1,se-var2,se-var3,se-gc --groups 8 || echo "some runs of (a) failed: see $out/lite0-blocks/ablation.csv"
study "$out/lite0-placements" --blocks none,eca --placements standard,pre,post,identity || echo "some runs of (b) failed: see $out/lite0-placements/ablation.csv"
