#!/usr/bin/env bash
# Installs into ./.venv if needed, then serves the policy. Arguments go to scripts/serve_policy.py.
# With no weights given it serves random full-size weights on a GPU (or the tiny `pi0_tiny` on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ "$#" -eq 0 ]; then
  if "${VENV:-.venv}/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    set -- --backend triton
  else
    echo "no CUDA GPU: serving the tiny random CPU model (--backend torch --variant pi0_tiny)" >&2
    set -- --backend torch --variant pi0_tiny --device cpu
  fi
fi
exec "${VENV:-.venv}/bin/python" scripts/serve_policy.py "$@"
