#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# pqkv's CPU k-means vs faiss, on the same keys, in one command.
#
#   bench/run_kmeans_vs_faiss.sh [--record] [OUT_DIR]
#
# Builds only the pqkv_cpu_bench target, runs its kmeans_vs_faiss benchmarks
# (one head of 32768 synthetic keys, d = 128, m in {2, 8, 16}, nbits in {6, 8},
# 25 iterations, tol 0, THREADS threads), which write the keys and both codebooks to
# OUT_DIR, then trains faiss on the same keys (bench/anchors/faiss_kmeans.py)
# with OpenBLAS and with the system BLAS, and prints a table of times, speedups
# and MSEs. OUT_DIR gets pqkv_r<round>.json (Google Benchmark JSON),
# faiss_*_r<round>.json, summary.md and summary.json; --record also copies the summary to
# bench/results/<date>-cpu-kmeans-vs-faiss.{md,json}.
#
# Environment: BUILD_DIR (default <repo>/build-bench), PYTHON (default
# /usr/bin/python3, the interpreter with Debian's python3-faiss), THREADS (2),
# ROUNDS (3: each round times, per configuration, pqkv PQKV_REPS (3) times and
# then faiss with OpenBLAS once; best times are kept), CONFIGS ("2:6 2:8 8:6
# 8:8 16:6 16:8", m:nbits), FAISS_OPENBLAS_DIR (a folder with OpenBLAS's
# libblas.so.3; by default Debian's openblas-openmp folder, else the package is
# fetched once with `apt-get download libopenblas0-openmp` into BUILD_DIR),
# NO_OPENBLAS=1 / NO_SYSTEM_BLAS=1 to skip a faiss run, WAIT_QUIET (0; see
# below). Run it on a quiet machine: OpenMP's spinning makes faiss collapse
# when other work shares the cores.
set -euo pipefail

record=0
if [[ "${1:-}" == "--record" ]]; then
  record=1
  shift
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-bench}
out=${1:-$build/kmeans-vs-faiss}
python=${PYTHON:-/usr/bin/python3}
threads=${THREADS:-2}
rounds=${ROUNDS:-3}
configs=${CONFIGS:-"2:6 2:8 8:6 8:8 16:6 16:8"}
pqkv_reps=${PQKV_REPS:-3}
anchor=$root/bench/anchors/faiss_kmeans.py
mkdir -p "$out"
rm -f "$out"/*.npy "$out"/faiss_*.json "$out"/pqkv_*.json "$out"/pqkv_*.txt

# ---- build what the run needs ----
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  cmake -S "$root" -B "$build" -DPQKV_ENABLE_CUDA=OFF -DCMAKE_BUILD_TYPE=Release > "$out/cmake.log"
fi
cmake --build "$build" --target pqkv_cpu_bench -j "$threads" > "$out/build.log"
bench=$(find "$build" -name pqkv_cpu_bench -type f -perm -u+x | head -n 1)

# ---- where OpenBLAS's libblas.so.3 is ----
openblas=""
if [[ "${NO_OPENBLAS:-0}" != 1 ]]; then
  multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  for dir in "${FAISS_OPENBLAS_DIR:-}" "/usr/lib/$multiarch/openblas-openmp" "/usr/lib/$multiarch/openblas-pthread" \
             "$build/openblas/usr/lib/$multiarch/openblas-openmp"; do
    if [[ -n "$dir" && -f "$dir/libblas.so.3" ]]; then
      openblas=$dir
      break
    fi
  done
  if [[ -z "$openblas" ]]; then
    echo "fetching Debian's libopenblas0-openmp into $build/openblas (set NO_OPENBLAS=1 to skip)"
    mkdir -p "$build/openblas"
    if (cd "$build/openblas" && apt-get download libopenblas0-openmp > /dev/null 2>&1 &&
        dpkg-deb -x libopenblas0-openmp_*.deb .); then
      openblas="$build/openblas/usr/lib/$multiarch/openblas-openmp"
    else
      echo "warning: could not get OpenBLAS; faiss runs with the system BLAS only" >&2
    fi
  fi
fi

# ---- the run ----
{
  echo "date=$(date +%F)"
  echo "cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
  echo "cores=$(nproc)"
  echo "commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "dirty=$(git -C "$root" status --porcelain 2>/dev/null | grep -c . || true)"
  echo "load_before=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "threads=$threads"
  echo "rounds=$rounds"
  echo "pqkv_reps=$pqkv_reps"
  echo "wait_quiet=${WAIT_QUIET:-0}"
  echo "openblas=$openblas"
} > "$out/meta.txt"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

# With WAIT_QUIET=S, each timed step first waits (up to S seconds) until the
# machine has been idle for a second (at most 2 runnable tasks: the probe
# itself and a stray one; a -j2 build elsewhere shows 3 or more): on a shared
# machine the timings then come from its quiet moments.
wait_quiet() {
  [[ "${WAIT_QUIET:-0}" -gt 0 ]] || return 0
  local deadline=$((SECONDS + WAIT_QUIET)) calm=0 running
  while ((SECONDS < deadline)); do
    running=$(awk '/^procs_running/ {print $2}' /proc/stat)
    if ((running <= 2)); then
      calm=$((calm + 1))
      ((calm >= 10)) && return 0
    else
      calm=0
    fi
    sleep 0.1
  done
  echo "  still busy after ${WAIT_QUIET} s; timing anyway"
}

# Each round times pqkv and then faiss on one configuration after the other,
# seconds apart, and the summary keeps each side's best time, so bursts of
# other work on the machine hit both alike.
for round in $(seq "$rounds"); do
  for config in $configs; do
    m=${config%%:*}
    nbits=${config##*:}
    tag="r${round}_m${m}_n${nbits}"
    wait_quiet
    echo "round $round/$rounds m=$m nbits=$nbits (load $(cut -d' ' -f1 /proc/loadavg))"
    PQKV_KMEANS_DUMP_DIR="$out" "$bench" --benchmark_filter="^kmeans_vs_faiss/m:$m/nbits:$nbits/threads:$threads/" \
      --benchmark_repetitions="$pqkv_reps" --benchmark_out="$out/pqkv_$tag.json" \
      --benchmark_out_format=json > "$out/pqkv_$tag.txt"
    if [[ -n "$openblas" ]]; then
      wait_quiet
      LD_LIBRARY_PATH="$openblas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" OMP_NUM_THREADS=$threads \
        "$python" "$anchor" "$out" --configs "$config" --threads "$threads" --reps 1 --label faiss-openblas \
        --out "$out/faiss_openblas_$tag.json"
    fi
  done
done
# The system BLAS (Debian's default is the reference netlib BLAS, ~10x slower
# than OpenBLAS here) once, with faiss's own init only: a secondary reference.
if [[ "${NO_SYSTEM_BLAS:-0}" != 1 ]]; then
  echo "faiss with the system BLAS (load $(cut -d' ' -f1 /proc/loadavg))"
  OMP_NUM_THREADS=$threads "$python" "$anchor" "$out" --threads "$threads" --reps 1 --modes own_init \
    --configs "${configs// /,}" --label faiss-system-blas --out "$out/faiss_system_r1.json"
fi
echo "load_after=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/meta.txt"

"$python" "$anchor" --summarize "$out"
if [[ $record == 1 ]]; then
  stem="$root/bench/results/$(date +%F)-cpu-kmeans-vs-faiss"
  mkdir -p "$root/bench/results"
  cp "$out/summary.md" "$stem.md"
  cp "$out/summary.json" "$stem.json"
  echo "recorded $stem.{md,json}"
fi
