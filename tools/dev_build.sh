#!/usr/bin/env bash
# Developer build: CMake + Ninja into build/dev, the _C module copied into mblm/ so that the
# source tree is importable, the GoogleTest binary built beside it. Incremental; serialised with
# a lock so concurrent callers do not corrupt the build directory.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
exec 9>build/.dev_build.lock
flock 9
BUILD_DIR=${MBLM_BUILD_DIR:-build/dev}
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
LAUNCHER=()
command -v ccache >/dev/null && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" "${LAUNCHER[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DMBLM_INPLACE=ON -DMBLM_BUILD_TESTS="${MBLM_BUILD_TESTS:-ON}" \
    -DPython_EXECUTABLE="$(command -v python3)" "$@"
fi
cmake --build "$BUILD_DIR" -j "${MBLM_JOBS:-$(nproc)}"
