#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds pqkv and runs all its tests:
#   1. the default build: CPU tests, the install + find_package consumer test and,
#      when nvcc is present, the CUDA tests (each skips with a message without a GPU);
#      benchmarks and examples are compiled too;
#   2. the CPU tests again under AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/cmake-args.sh
jobs=$(nproc)

if command -v nvcc >/dev/null 2>&1; then preset=cuda; else preset=cpu; fi
cmake --preset "$preset" "${pqkv_cmake_args[@]}"
cmake --build --preset "$preset" -j "$jobs"
ctest --preset "$preset"

cmake --preset asan "${pqkv_cmake_args[@]}"
cmake --build --preset asan -j "$jobs"
ctest --preset asan
