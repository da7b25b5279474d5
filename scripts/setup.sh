#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install retrofit with its dev and demo extras.
# Usage: source scripts/setup.sh      (VENV=path to choose the folder; default .venv)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
log="$venv/retrofit-install.log"
echo "installing into $venv (log: $log)"
{
  python -m pip install --upgrade pip
  # torch 2.14.1 / torchvision 0.29.1 are the pinned, tested pair (any torch>=2.1,<2.15 works).
  python -m pip install "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install -e "$root[dev,demo]"
} >"$log" 2>&1 || { tail -n 30 "$log"; echo "install failed; see $log" >&2; exit 1; }
