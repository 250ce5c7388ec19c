#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds and runs examples/pqcache_demo (CPU backend on a machine without a GPU).
# Arguments are passed to the demo (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/cmake-args.sh
cmake --preset cpu "${pqkv_cmake_args[@]}" >/dev/null
cmake --build --preset cpu -j "$(nproc)" --target pqcache_demo
./build/cpu/examples/pqcache_demo "$@"
