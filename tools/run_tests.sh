#!/usr/bin/env bash
# The whole test suite: builds the source tree incrementally (tools/dev_build.sh), runs the
# GoogleTest binary through ctest, then pytest on the source tree. Extra arguments go to pytest.
# Uses .venv (made by tools/setup.sh) when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
export CCACHE_DIR=${CCACHE_DIR:-$PWD/build/ccache}
bash tools/dev_build.sh
ctest --test-dir "${MBLM_BUILD_DIR:-build/dev}" --output-on-failure -j 2
python3 -m pytest tests -q "$@"
