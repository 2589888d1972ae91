#!/usr/bin/env bash
# CE-GPPO on DeepSeek-R1-Distill-Qwen-1.5B, β1 = 0.5, β2 = 1 (the paper's Table 1 run, 16 nodes × 8 GPUs).
# MODEL_PATH defaults to the Hub id; see ce_gppo_recipe.sh for the other settings and README.md for the data.
set -euo pipefail
export MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}
export BETA1=${BETA1:-0.5}
exec bash "$(dirname "${BASH_SOURCE[0]}")/ce_gppo_recipe.sh" "$@"
