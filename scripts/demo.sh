#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds and runs examples/pqcache_demo: with the `cuda` preset when nvcc is
# present (the demo then runs on the GPU if the machine has one; --backend
# picks), else with the `cpu` preset. Arguments are passed to the demo (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/cmake-args.sh
if command -v nvcc >/dev/null 2>&1; then preset=cuda; else preset=cpu; fi
cmake --preset "$preset" "${pqkv_cmake_args[@]}" >/dev/null
cmake --build --preset "$preset" -j "$(nproc)" --target pqcache_demo
"./build/$preset/examples/pqcache_demo" "$@"
