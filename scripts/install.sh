#!/usr/bin/env bash
# Creates ./.venv (or $VENV) and installs this project with its dev extras. Idempotent.
# On a machine without an NVIDIA GPU a CPU build of PyTorch is preferred (smaller, and what CI uses).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch}"
  else
    # torch 2.13.0's CPU build where the machine provides it; any torch build works otherwise.
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" || "$VENV/bin/python" -m pip install -q torch
  fi
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, triton, jax, openpi_client, websockets; print('installed: torch', torch.__version__, '| triton', triton.__version__, '| jax', jax.__version__, '| cuda', torch.cuda.is_available())"
