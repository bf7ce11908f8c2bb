#!/usr/bin/env bash
# One command on a CUDA machine: build with the CUDA kernels, run the whole test suite (the CUDA
# tests run there) and the GPU benchmarks. Offline-friendly: wheels found in build/gpu_wheels
# (made with `pip download --only-binary=:all: --python-version 3.12 -d build/gpu_wheels pydantic
# pyyaml tqdm pytest einops numpy filelock pillow safetensors typing_extensions matplotlib`) are
# installed without an index.
# Outputs land in ${OUT:-build/gpu-out}: the pytest log and junit XML, benchmark logs and rows.
# mamba_ssm peers (bench_ssd, bench_mamba_layer, tests/model/test_mamba2_vs_mamba_ssm.py) need its
# source, carried as build/mamba_ssm_src (or $MBLM_MAMBA_SSM_SRC; see benchmarks/_mamba_ssm.py).
#   bash tools/gpu_check.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

missing=$($PY - <<'PY'
import importlib.util
mods = ("pydantic", "yaml", "tqdm", "pytest", "einops", "numpy", "filelock", "PIL", "safetensors",
        "typing_extensions", "matplotlib")
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  pkgs=${missing/yaml/pyyaml}
  pkgs=${pkgs/PIL/pillow}
  if [ -d build/gpu_wheels ]; then
    $PY -m pip install -q --no-index --find-links build/gpu_wheels $pkgs 2>&1 | tail -n 3
  else
    $PY -m pip install -q $pkgs
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# Some CUDA images point CC/CXX at a private GCC whose static libstdc++ ends up inside _C.so;
# its second copy of the C++ runtime crashes the first error message that formats a number.
# Build with the system compilers that torch itself was built against.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi
BUILD_DIR=${MBLM_BUILD_DIR:-build/gpu}
start=$(date +%s)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMBLM_CUDA=ON -DMBLM_INPLACE=ON \
  -DMBLM_BUILD_TESTS=OFF -DCMAKE_CUDA_ARCHITECTURES="${MBLM_CUDA_ARCHS:-90}" \
  -DPython_EXECUTABLE="$(command -v $PY)" > "$OUT/cmake.log" 2>&1 || { tail -n 40 "$OUT/cmake.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "$(nproc)" > "$OUT/build.log" 2>&1 || { grep -E "error|Error" -A3 "$OUT/build.log" | head -n 80; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
$PY -m mblm.info | tee "$OUT/info.txt"

$PY -m pytest tests -q -p no:cacheprovider --junitxml="$OUT/junit.xml" "$@" > "$OUT/pytest.log" 2>&1
rc=$?
tail -n 60 "$OUT/pytest.log"
if [ "${MBLM_GPU_BENCH:-1}" = 1 ]; then
  for b in benchmarks/bench_*.py; do
    echo "== $b"
    timeout 300 $PY "$b" --device cuda > "$OUT/$(basename "$b" .py).log" 2>&1
    tail -n 30 "$OUT/$(basename "$b" .py).log"
  done
  cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
fi
exit $rc
