#!/usr/bin/env bash
# The test suite: set up with every extra (deepspeed, mpi4py, transformers, ...), install Open MPI where we can
# (for the real `mpirun -np 2` test), lint, type-check, then pytest. Extra arguments go to pytest (e.g. -m slow,
# -k parallel).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh --extras
if ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null) \
      || echo "note: could not install Open MPI; the mpirun test will be skipped"
  else
    echo "note: mpirun not found and cannot install it here; the mpirun test will be skipped"
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Type check megatron_ext/ and tools/ (settings: [tool.mypy] in pyproject.toml).
.venv/bin/mypy
# pytest exits 5 when no test ran: with `set -e` that fails the run, as it should.
.venv/bin/python -m pytest "$@"
