#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install retrofit with its dev and demo extras.
# Usage: source scripts/setup.sh      (VENV=path to choose the folder; default .venv)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 are the pinned, tested pair (any torch>=2.1,<2.15 works).
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e "$root[dev,demo]"
