#!/usr/bin/env bash
# Idempotent environment setup: a virtual environment in .venv with every dependency from pyproject.toml.
# torch is pinned by constraints.txt through PIP_CONSTRAINT, so no package (not even one built from source)
# can pull a different (CUDA) torch. Usage: scripts/setup.sh [--extras]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PIP_CONSTRAINT="$root/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
venv="${VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
groups="dev"
[ "${1:-}" = "--extras" ] && groups="dev,extras"
stamp="$venv/.setup-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)-$groups"
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$venv/bin/python" -m pip install -q -e ".[$groups]"
  touch "$stamp"
fi
"$venv/bin/python" -W ignore -c "import torch, megatron.core; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
