#!/usr/bin/env bash
# Install, then train a small GPT-2 on the bundled State of the Union corpus with every block layer
# low-rank (dense warm start, then half the weights), beside a full-rank run of the same length, and
# print perplexities, ranks, parameter counts and speed side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/hf-lowrank train recipes/configs/quickstart.yaml "$@"
