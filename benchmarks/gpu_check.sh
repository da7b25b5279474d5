#!/usr/bin/env bash
# Every CUDA path of retrofit, once, in at most ~8 minutes on one H200 (issue 11). Figures go to
# $OUT/gpu_check.md (or ./gpu_check.md); each step's log to $OUT/gpu_check.log.
#
#   1. finetune the real EfficientNet-Lite0 weights + ECA on digits: bf16 autocast + channels_last
#   2. the same with --compile (and the train/eval switch must not recompile at every epoch)
#   3. torchrun --nproc-per-node 1 (NCCL)
#   4. benchmarks/inference.py on CUDA (bf16, NCHW and channels_last): retrofit vs timm's native vs bare
#   5. benchmarks/train.py on CUDA: retrofit finetune vs a plain loop
#   6. the out-of-memory message (a batch chosen to overflow the card): one line, exit 2
#   7. retrofit evaluate of step 1's best checkpoint on CUDA
#
# Without a CUDA device it says "no CUDA device: GPU checks skipped" and exits 0.
# Python: $PYTHON, else .venv/bin/python, else python3 (the device machine's own torch); retrofit
# is imported from this tree (PYTHONPATH), so nothing needs installing there.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
out_dir="${OUT:-$root}"
report="$out_dir/gpu_check.md"
log="$out_dir/gpu_check.log"

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: GPU checks skipped"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rf() { "$py" -m retrofit "$@"; }
failed=0
step() {  # step NAME COMMAND…: run, time, record pass/fail and the last line in the report
  local name="$1"; shift
  local start=$SECONDS
  echo "== $name: $*" >>"$log"
  if "$@" >>"$log" 2>&1; then status=ok; else status="FAILED ($?)"; failed=1; fi
  echo "| $name | $status | $((SECONDS - start)) s |" >>"$report"
}

{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  "$py" -c "import torch, timm; print(f'torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}')"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
} >"$report"
: >"$log"

rf demo weights -o "$work/lite0.safetensors" >>"$log" 2>&1
common=(tf_efficientnet_lite0 --weights "$work/lite0.safetensors" --data digits --block eca --img-size 64
        --epochs 3 -b 64 --workers 4 --precision auto --channels-last)
step "finetune bf16 + channels_last" rf finetune "${common[@]}" -o "$work/run" --json
step "finetune --compile" env TORCH_LOGS=recompiles rf finetune "${common[@]}" --compile -o "$work/run-compiled" --json
recompiles=$(grep -c "Recompiling function" "$log" || true)
echo "| recompilations logged by --compile (train/eval switch) | $recompiles | |" >>"$report"
step "torchrun --nproc-per-node 1 (NCCL)" "$py" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m retrofit finetune "${common[@]}" --epochs 1 -o "$work/run-ddp"
step "evaluate best checkpoint on CUDA" rf evaluate "$work/run/best.safetensors" --data digits --json
step "out-of-memory message" bash -c "
  out=\$(\"$py\" -m retrofit finetune resnet50 \
        --no-pretrained --data digits --img-size 1024 -b 4096 --epochs 1 -o '$work/oom' 2>&1); rc=\$?
  echo \"\$out\"; [ \$rc -eq 2 ] && [ \$(echo \"\$out\" | grep -c '^error:') -eq 1 ] && echo \"\$out\" | grep -qi 'memory'"
{ echo; echo "## Inference (CUDA)"; echo; } >>"$report"
"$py" benchmarks/inference.py --devices cuda --repeats 21 >>"$report" 2>>"$log" || { echo "inference benchmark FAILED" >>"$report"; failed=1; }
{ echo; echo "## Training step (CUDA)"; echo; } >>"$report"
"$py" benchmarks/train.py --device cuda >>"$report" 2>>"$log" || { echo "train benchmark FAILED" >>"$report"; failed=1; }

cat "$report"
exit $failed
