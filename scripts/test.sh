#!/usr/bin/env bash
# Set up the test environment and run the whole test suite; this is exactly what CI runs.
#
#   bash scripts/test.sh                  # everything, including the few-minute tests on the real SmolLM2
#   bash scripts/test.sh -m "not slow"    # only the fast tests on tiny random models
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pytest --timeout=900 --durations=10 "$@"
