#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds pqkv and runs all its tests:
#   1. the default build: CPU tests, the install + find_package consumer test and,
#      when nvcc is present, the CUDA tests (each skips with a message without a GPU);
#      benchmarks and examples are compiled too (the CUDA benchmarks and CUDA-only
#      examples only when a GPU is visible, since nothing else can run them);
#   2. the CPU tests again under AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/cmake-args.sh
jobs=$(nproc)

if command -v nvcc >/dev/null 2>&1; then preset=cuda; else preset=cpu; fi
extras=(-DPQKV_BUILD_CUDA_EXTRAS=ON)
if [ "$preset" = cuda ] && ! nvidia-smi -L >/dev/null 2>&1; then
  # No GPU to run them: compile the CUDA tests (they skip with a message) but
  # not the CUDA benchmarks and the CUDA-only examples, which only a GPU
  # machine can run (scripts/gpu-suite.sh builds and runs those).
  echo "test.sh: no GPU visible; CUDA benchmarks and CUDA-only examples are not built"
  extras=(-DPQKV_BUILD_CUDA_EXTRAS=OFF)
fi
cmake --preset "$preset" "${pqkv_cmake_args[@]}" "${extras[@]}"
cmake --build --preset "$preset" -j "$jobs"
ctest --preset "$preset"

cmake --preset asan "${pqkv_cmake_args[@]}"
cmake --build --preset asan -j "$jobs"
ctest --preset asan
