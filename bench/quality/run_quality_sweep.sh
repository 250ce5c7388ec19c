#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Quality vs memory of PQ token selection on the realistic synthetic keys, in
# one command (no CMake, no Google Benchmark needed).
#
#   bench/quality/run_quality_sweep.sh [--record] [OUT_DIR]
#
# Builds bench/quality/quality_sweep.cpp as a plain program with $CXX, runs the
# sweep (default: 131072 tokens, 8 KV heads, 32 q heads, d = 128, 16 queries,
# (m, nbits) in {(2,6), (8,8), (16,8), (32,8)} x k in {2048, n/5}, sink 4,
# window 64, k-means on a 32768-token subsample per KV head), and writes
# OUT_DIR/quality.json, OUT_DIR/quality.md and OUT_DIR/quality_vs_bytes.svg.
# --record also copies them to bench/results/<date>-cpu-quality-sweep.{json,md}
# and docs/quality_vs_bytes.svg.
#
# Environment: CXX (g++), CCCL_INCLUDE (the folder holding cuda/std/mdspan;
# default: the CUDA Toolkit's include/cccl or include), PYTHON (python3),
# THREADS (0: all), SWEEP_ARGS (extra options for the program, e.g.
# "--queries 4 --tokens 32768"; see its --help-free option list in main()).
set -euo pipefail

record=0
if [[ "${1:-}" == "--record" ]]; then
  record=1
  shift
fi
# shellcheck source=bench/quality/script_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/script_env.sh"
out=${1:-$root/build-quality-sweep}
mkdir -p "$out"

"$cxx" -std=c++20 -O3 -march=native -DNDEBUG -DPQKV_QUALITY_SWEEP_MAIN "${includes[@]}" \
  "$root/bench/quality/quality_sweep.cpp" -o "$out/quality_sweep" -pthread

date_utc=$(date -u +%Y-%m-%d)
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
machine="${cpu:-unknown CPU}, $(nproc) cores"
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git -C "$root" diff --quiet HEAD -- include bench/quality tests/common 2>/dev/null ||
   [[ -n "$(git -C "$root" ls-files --others --exclude-standard -- include bench/quality tests/common 2>/dev/null)" ]]; then
  commit="$commit+uncommitted"
fi

# shellcheck disable=SC2086
"$out/quality_sweep" --threads "$threads" ${SWEEP_ARGS:---queries 16} --out "$out/quality.json" \
  --meta "date=$date_utc" --meta "machine=$machine" --meta "commit=$commit" \
  --meta "command=bench/quality/run_quality_sweep.sh${SWEEP_ARGS:+ (SWEEP_ARGS=$SWEEP_ARGS)}" 2> >(tee "$out/log.txt" >&2)

"$python" "$root/bench/quality/report_quality.py" "$out/quality.json" "$out/quality.md" "$out/quality_vs_bytes.svg"

if [[ $record == 1 ]]; then
  cp "$out/quality.json" "$root/bench/results/$date_utc-cpu-quality-sweep.json"
  cp "$out/quality.md" "$root/bench/results/$date_utc-cpu-quality-sweep.md"
  cp "$out/quality_vs_bytes.svg" "$root/docs/quality_vs_bytes.svg"
fi
cat "$out/quality.md"
