#!/usr/bin/env bash
# The GPU work of issue 8 on a CUDA machine, in steps that each fit one device command (10 min):
#
#   bash tools/gpu_check.sh build test            # CUDA build, then the whole test suite
#   bash tools/gpu_check.sh build bench-ops       # attention vs every SDPA backend, conv, patch
#   bash tools/gpu_check.sh build bench-mamba     # SSD / Mamba2 layer vs mamba_ssm, scan
#   bash tools/gpu_check.sh build bench-model     # paper-sized train steps vs the original, bf16
#   bash tools/gpu_check.sh build long-context    # largest trainable input length, bf16
#   bash tools/gpu_check.sh all                   # everything (more than one device command)
#
# Offline: run `bash tools/gpu_wheels.sh` where there is internet first and carry build/gpu_wheels
# and build/mamba_ssm_src (the mamba_ssm peers of bench_ssd, bench_mamba_layer and
# tests/model/test_mamba2_vs_mamba_ssm.py import its source from there, see
# benchmarks/_mamba_ssm.py); what the GPU machine lacks is installed from there. The build is
# incremental (build/gpu), so `build` is cheap after the first time on a warm machine.
# Logs, junit XML and benchmark rows land in ${MBLM_GPU_LOGS:-build/gpu-out}; when $OUT is set
# (the device tool's folder of files to bring back) they are also packed into
# $OUT/gpu-out.tar.gz. Extra arguments after `--` go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${MBLM_GPU_LOGS:-build/gpu-out}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
# The CUDA kernels not yet proven on a GPU are what this script is for: use them (see
# mblm/ops/_common.py; `MBLM_CUDA_UNPROVEN= bash tools/gpu_check.sh ...` measures the defaults).
export MBLM_CUDA_UNPROVEN=${MBLM_CUDA_UNPROVEN-1}
export PYTHONUNBUFFERED=1 MBLM_MAMBA_SSM_SRC=${MBLM_MAMBA_SSM_SRC:-$PWD/build/mamba_ssm_src}

steps=()
pytest_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; pytest_args=("$@"); break; fi
  steps+=("$1"); shift
done
[ ${#steps[@]} -eq 0 ] && steps=(build test)
[ "${steps[0]}" = all ] && steps=(build test bench-ops bench-mamba bench-model long-context)

install_missing() {
  local missing
  missing=$($PY - <<'PY'
import importlib.util
mods = {"pydantic": "pydantic", "yaml": "pyyaml", "tqdm": "tqdm", "pytest": "pytest",
        "einops": "einops", "numpy": "numpy", "filelock": "filelock", "PIL": "pillow",
        "safetensors": "safetensors", "typing_extensions": "typing_extensions"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
PY
)
  [ -z "$missing" ] && return 0
  if [ -d build/gpu_wheels ]; then
    $PY -m pip install -q --no-index --find-links build/gpu_wheels $missing 2>&1 | tail -n 3
  else
    $PY -m pip install -q $missing
  fi
}

step_build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
  # Some CUDA images point CC/CXX at a private GCC whose static libstdc++ ends up inside _C.so;
  # its second copy of the C++ runtime crashes the first error message that formats a number.
  # Build with the system compilers that torch itself was built against.
  if [ -x /usr/bin/g++ ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
  fi
  local dir=${MBLM_BUILD_DIR:-build/gpu} start
  start=$(date +%s)
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMBLM_CUDA=ON -DMBLM_INPLACE=ON \
    -DMBLM_BUILD_TESTS=OFF -DCMAKE_CUDA_ARCHITECTURES="${MBLM_CUDA_ARCHS:-90}" \
    -DPython_EXECUTABLE="$(command -v "$PY")" > "$LOGS/cmake.log" 2>&1 ||
    { tail -n 40 "$LOGS/cmake.log"; return 1; }
  cmake --build "$dir" -j "$(nproc)" > "$LOGS/build.log" 2>&1 ||
    { grep -E "error|Error" -A3 "$LOGS/build.log" | head -n 80; return 1; }
  echo "build: $(($(date +%s) - start)) s"
  $PY -m mblm.info | tee "$LOGS/info.txt"
}

step_test() {
  $PY -m pytest tests -q -p no:cacheprovider --junitxml="$LOGS/junit.xml" "${pytest_args[@]}" \
    > "$LOGS/pytest.log" 2>&1
  local rc=$?
  tail -n 60 "$LOGS/pytest.log"
  return $rc
}

# One benchmark under a time limit; its log goes to $LOGS and its tail to stdout.
bench() {
  local name=$1 limit=$2
  shift 2
  echo "== $name $*"
  timeout "$limit" $PY "benchmarks/$name.py" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "(stopped after $limit s)"
  tail -n 30 "$LOGS/$name.log"
  return 0
}

step_bench_ops() {
  bench bench_attention 240 --device cuda --dtype bfloat16
  bench bench_conv 60 --device cuda
  bench bench_patch 60 --device cuda
}

step_bench_mamba() {
  bench bench_ssd 180 --device cuda --dtype bfloat16
  bench bench_scan 90 --device cuda
  bench bench_mamba_layer 150 --device cuda
}

# The original mblm 0.4.2 beside the machine's CUDA torch: its wheels go into their own folder
# (not a venv: the machine's python is itself a venv, whose packages a new venv would not see),
# and a wrapper runs the machine's python with only that folder in front. The benchmark workers
# start outside the checkout, so `import mblm` there finds the original.
setup_original() {
  local site=$PWD/build/orig-site wrapper=$PWD/build/orig-python
  if [ ! -d "$site/mblm" ]; then
    $PY -m pip install -q --no-index --no-deps --target "$site" --find-links build/gpu_wheels \
      mblm==0.4.2 megabyte-pytorch mambapy beartype einops 2>&1 | tail -n 3
  fi
  printf '#!/usr/bin/env bash\nPYTHONPATH=%s exec %s "$@"\n' "$site" "$($PY -c 'import sys; print(sys.executable)')" > "$wrapper"
  chmod +x "$wrapper"
  echo "$wrapper"
}

step_bench_model() {
  local orig
  orig=$(setup_original | tail -n 1)
  bench bench_model 280 --model paper-transformer --device cuda --dtype bfloat16 --rounds 1 \
    --repeats 2 --orig-python "$orig"
  bench bench_model 220 --model paper-hybrid --device cuda --dtype bfloat16 --rounds 1 \
    --repeats 2 --orig-python "$orig"
}

step_long_context() {
  bench bench_long_context 500 --preset paper-hybrid --time-budget 480 --refine 2
}

install_missing
rc=0
for step in "${steps[@]}"; do
  case $step in
    build) step_build || exit 1 ;;
    test) step_test || rc=1 ;;
    bench-ops) step_bench_ops ;;
    bench-mamba) step_bench_mamba ;;
    bench-model) step_bench_model ;;
    long-context) step_long_context ;;
    *) echo "unknown step: $step (build test bench-ops bench-mamba bench-model long-context all)"; exit 2 ;;
  esac
done
cp benchmarks/results/*.csv "$LOGS/" 2>/dev/null
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  tar -czf "$OUT/gpu-out.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
fi
exit $rc
