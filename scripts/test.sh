#!/usr/bin/env bash
# Install into a virtual environment (VENV, default .venv) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
cd "$root"
python -m pytest -q "$@"
