#!/usr/bin/env bash
# Run on a machine WITH internet, before a session on the offline GPU machine: downloads what
# tools/gpu_check.sh installs there (Python 3.12, manylinux x86_64) into build/gpu_wheels, and
# unpacks mamba_ssm's source into build/mamba_ssm_src (its Triton SSD path and Mamba2 module run
# without building its CUDA extension; benchmarks/_mamba_ssm.py imports it from there).
#   bash tools/gpu_wheels.sh            # then carry build/gpu_wheels and build/mamba_ssm_src
# The GPU machine brings torch (CUDA), triton, cmake, ninja and pybind11 itself.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=build/gpu_wheels
PY_VERSION=${MBLM_GPU_PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
# mamba_ssm's metadata step imports torch and wheel: the project's venv (tools/setup.sh) has both.
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
platform=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux_2_28_x86_64 --implementation cp --python-version "$PY_VERSION")

# Only what the GPU image lacks (it has numpy, pyyaml, pytest, einops, pillow, safetensors, tqdm,
# filelock, packaging, huggingface_hub; see the device tool's KINDS.md): pydantic with its
# dependencies, and beartype for MEGABYTE-pytorch. Then the original mblm 0.4.2 without its
# declared dependencies (they pull transformers and ipykernel, which its model code never imports).
$PY -m pip download -q --only-binary=:all: "${platform[@]}" -d "$DEST" "pydantic>=2.9" beartype
$PY -m pip download -q --only-binary=:all: "${platform[@]}" -d "$DEST" --no-deps \
  "mblm==0.4.2" "megabyte-pytorch>=0.3.6" "mambapy>=1.2.0" "einops>=0.8"

# mamba_ssm: the source distribution only (no build). Its metadata step imports torch and must not
# try to compile, hence the skip flags and no build isolation.
src_tmp=$(mktemp -d)
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $PY -m pip download -q \
  --no-deps --no-binary=:all: --no-build-isolation -d "$src_tmp" "mamba-ssm==${MAMBA_SSM_VERSION:-2.3.2.post1}"
rm -rf build/mamba_ssm_src
mkdir -p build/mamba_ssm_src
tar -xzf "$src_tmp"/mamba_ssm-*.tar.gz -C "$src_tmp"
cp -r "$src_tmp"/mamba_ssm-*/mamba_ssm build/mamba_ssm_src/
rm -rf "$src_tmp"

du -sh "$DEST" build/mamba_ssm_src
ls "$DEST"
