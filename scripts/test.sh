#!/usr/bin/env bash
# Set up a virtual environment (CPU torch pinned) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0" -e ".[test]"
.venv/bin/python -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
.venv/bin/python -m pytest -q "$@"
