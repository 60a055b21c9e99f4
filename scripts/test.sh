#!/usr/bin/env bash
# Set up a virtual environment (CPU torch pinned) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0" -e ".[test]"
# No Jupyter kernel is installed: tests/test_tutorials.py registers one for this .venv's Python
# in a temporary Jupyter path, so the user's own kernels are never touched.
.venv/bin/python -m pytest -q "$@"
