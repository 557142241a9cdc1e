#!/usr/bin/env bash
# The test command: installs into ./.venv if needed, then runs the whole suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
