#!/usr/bin/env bash
# Installs medllama-jax into .venv and runs the embedded demo on CPU (8 simulated devices).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
.venv/bin/python -m medllama_jax.demo --out demo_output "$@"
