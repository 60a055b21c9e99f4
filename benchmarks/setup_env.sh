#!/usr/bin/env bash
# Create benchmarks/.venv-scvi: scvi-tools 1.4.2 + pyro_totalvi (editable) side by side,
# for benchmarks/compare_scvi.py. Idempotent: re-running only installs what is missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="$HERE/.venv-scvi"
PY="${PYTHON:-python3}"

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# 1. torch first, pinned: a loose torch requirement (as scvi-tools has) would otherwise pull
#    a multi-GB CUDA build. 2.13.0 is the CPU wheel available locally.
"${PIP[@]}" "torch==2.13.0"

# 2. scvi-tools 1.4.2 (newest release supporting Python 3.11). Keep torch pinned while
#    resolving its dependencies (lightning, jax, flax, numpyro, ...).
"${PIP[@]}" "scvi-tools==1.4.2" "torch==2.13.0"

# 3. pyro_totalvi (editable) with its own requirements, torch still pinned.
"${PIP[@]}" -e "$ROOT" psutil "torch==2.13.0"

"$VENV/bin/python" - <<'PY'
import torch, scvi, pyro
print(f"torch {torch.__version__}  scvi-tools {scvi.__version__}  pyro {pyro.__version__}")
PY
echo "setup_env.sh: done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
