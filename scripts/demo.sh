#!/usr/bin/env bash
# Installs medllama-jax into .venv and runs the embedded demo on CPU (8 simulated devices):
# prepare corpora, continual pre-training (killed and resumed), HF export checked by transformers, generation.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "installing medllama-jax and its dependencies into .venv (a few minutes)"
python3 -m venv .venv
.venv/bin/python -m pip install -qq -e ".[hf]"
echo "installed in $(( SECONDS / 60 ))m$(( SECONDS % 60 ))s; running the demo"
.venv/bin/python -m medllama_jax.cli.demo --out demo_output "$@"
