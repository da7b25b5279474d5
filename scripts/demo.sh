#!/usr/bin/env bash
# Quick start, offline: real ImageNet EfficientNet-Lite0 weights + ECA retrofit + real photos.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
out="$root/demo-out"
mkdir -p "$out"
cd "$out"
retrofit demo weights -o tf_efficientnet_lite0.safetensors --overwrite
retrofit demo photos . --overwrite
retrofit add-eca tf_efficientnet_lite0 --weights tf_efficientnet_lite0.safetensors \
  -o tf_efficientnet_lite0-eca.safetensors --overwrite
retrofit compare tf_efficientnet_lite0 tf_efficientnet_lite0-eca.safetensors chelsea.png coffee.png \
  --weights tf_efficientnet_lite0.safetensors
retrofit predict tf_efficientnet_lite0-eca.safetensors chelsea.png coffee.png
echo "ImageNet: 285 = Egyptian cat, 967 = espresso. Outputs are in $out"
