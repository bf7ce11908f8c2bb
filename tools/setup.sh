#!/usr/bin/env bash
# One-shot set-up on a fresh machine: system packages (GoogleTest, yaml-cpp, ccache) when run as
# root, a virtual environment in .venv, torch, the build tools, and mblm-cpp itself built against
# that torch (--no-build-isolation). Idempotent: a second run rebuilds incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${MBLM_TORCH_SPEC:-torch==2.13.0}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s libgtest-dev libyaml-cpp-dev ccache >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev libyaml-cpp-dev ccache >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # the spec may carry pip options (an index URL)
$PY -m pip install -q $TORCH_SPEC
$PY -m pip install -q -r requirements/build.txt -r requirements/test.txt

export CCACHE_DIR=${CCACHE_DIR:-$PWD/build/ccache}
CMAKE_ARGS=()
if command -v ccache >/dev/null; then
  CMAKE_ARGS+=(-Ccmake.define.CMAKE_CXX_COMPILER_LAUNCHER=ccache -Ccmake.define.CMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
$PY -m pip install -q --no-build-isolation "${CMAKE_ARGS[@]}" .
# from outside the checkout, so that the installed package (not the source tree) is imported
(cd / && "$OLDPWD/$PY" -m mblm.info)
