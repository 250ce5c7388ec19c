#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# On a machine with an NVIDIA GPU: builds the CUDA tests and benchmarks
# (Release), then runs, each step under its own time limit so one slow step
# cannot eat the others' time:
#   tests            pqkv_cuda_tests
#   memcheck         compute-sanitizer --tool memcheck over the tests
#   racecheck        compute-sanitizer --tool racecheck over the tests
#   bench            pqkv_cuda_bench, JSON
#   anchors          the torch anchor scripts in bench/anchors, JSON
# Logs and JSON go to $OUT_DIR (default build/gpu-suite/out); a summary of
# every step's exit status is printed at the end.
#
# Usage: scripts/gpu-suite.sh [steps...]   (default: all steps above)
# Environment:
#   PQKV_CMAKE_ARGS     extra configure arguments (e.g. -DCMAKE_PREFIX_PATH=...)
#   CUDAARCHS           CUDA architectures (default 90)
#   STEP_TIMEOUT        seconds per step (default 480)
#   TEST_FILTER         doctest -tc filter for tests and sanitizers (default: all)
#   SANITIZER_EXCLUDE   doctest -tce filter for the sanitizer runs (default: the largest cases)
#   BENCH_FILTER        --benchmark_filter (default: all)
#   BENCH_MIN_TIME      --benchmark_min_time in seconds (default 0.02)
set -uo pipefail
cd "$(dirname "$0")/.."
build=build/gpu-suite
out=${OUT_DIR:-$build/out}
limit=${STEP_TIMEOUT:-480}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests memcheck racecheck bench anchors)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/device.txt" 2>&1
git rev-parse --short HEAD > "$out/commit.txt" 2>/dev/null
date -u +%Y-%m-%dT%H:%M:%SZ > "$out/date.txt"

read -r -a extra <<< "${PQKV_CMAKE_ARGS:-}"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPQKV_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDAARCHS:-90}" "${extra[@]}" > "$out/configure.txt" 2>&1 ||
  { tail -20 "$out/configure.txt"; exit 1; }
cmake --build "$build" -j "$(nproc)" --target pqkv_cuda_tests pqkv_cuda_bench > "$out/build.txt" 2>&1 ||
  { grep -E "error" "$out/build.txt" | head -20; exit 1; }

tests_bin=$build/tests/pqkv_cuda_tests
bench_bin=$build/bench/pqkv_cuda_bench
filter=()
[ -n "${TEST_FILTER:-}" ] && filter=("-tc=$TEST_FILTER")
exclude="-tce=${SANITIZER_EXCLUDE:-*large n*,*softmax_sum matches*}"
declare -A status
run_step() {  # name, command...
  local name=$1
  shift
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  status[$name]=$?
  tail -3 "$out/$name.txt"
}
for step in "${steps[@]}"; do
  echo "== $step"
  case $step in
    tests) run_step tests "$tests_bin" "${filter[@]}" ;;
    memcheck) run_step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$tests_bin" "${filter[@]}" "$exclude" ;;
    racecheck) run_step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$tests_bin" "${filter[@]}" "$exclude" ;;
    bench) run_step bench "$bench_bin" --benchmark_filter="${BENCH_FILTER:-.}" \
             --benchmark_min_time="${BENCH_MIN_TIME:-0.02}" --benchmark_format=json \
             --benchmark_out="$out/pqkv_cuda_bench.json" ;;
    anchors)
      run_step torch_adc_topk sh -c "python3 bench/anchors/torch_adc_topk.py --reps 15 > '$out/torch_adc_topk.json'"
      run_step torch_kmeans python3 bench/anchors/torch_kmeans.py --out "$out/torch_kmeans.json"
      run_step torch_gather sh -c "python3 bench/anchors/torch_gather.py > '$out/torch_gather.json'" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
echo "== summary (exit status; 124: over ${limit}s)"
for name in "${!status[@]}"; do echo "$name ${status[$name]}"; done | sort
