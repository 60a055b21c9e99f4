#!/usr/bin/env bash
# Set up a virtual environment (CPU torch pinned) and run the main job on simulated data.
# Extra arguments go to `python -m pyro_totalvi train`, e.g. an .h5ad instead of --demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0" -e .
if [ "$#" -eq 0 ]; then set -- --demo --out results; fi
.venv/bin/python -m pyro_totalvi train "$@"
