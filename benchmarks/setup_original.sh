#!/usr/bin/env bash
# Creates build/orig-venv with the original mblm (PyPI 0.4.2, pure PyTorch) beside the same torch,
# the peer the model benchmarks compare against. Both packages are named `mblm`, so they never
# share an environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MBLM_ORIG_VENV:-build/orig-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import mblm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${MBLM_TORCH_SPEC:-torch==2.13.0}" "mblm==0.4.2"
fi
echo "$VENV/bin/python"
