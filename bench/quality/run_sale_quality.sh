#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Quality of SALE block-sparse prefill masks against dense causal attention on
# the CPU, in one command (no CMake, no Google Benchmark needed).
#
#   bench/quality/run_sale_quality.sh [--record] [OUT_DIR]
#
# Builds bench/quality/sale_quality.cpp as a plain program with $CXX and runs it
# (default: 8192 tokens, 8 KV heads, 32 q heads, d = 128, float; SALE 4-bit and
# 8-bit per token and the mean-pooled estimator, 6 taus each; about 20 minutes
# on 2 cores). Writes OUT_DIR/sale_quality.json, OUT_DIR/sale_quality_tables.md
# (the tables of the results page) and OUT_DIR/sale_quality.svg (error vs
# density). --record also copies the JSON to
# bench/results/<date>-cpu-sale-quality.json and the plot to docs/sale_quality.svg;
# the results page around the tables (header, findings) is written by hand.
#
# Environment: CXX (g++), CCCL_INCLUDE (the folder holding cuda/std/mdspan;
# default: the CUDA Toolkit's include/cccl or include), PYTHON (python3),
# THREADS (0: all), SALE_ARGS (extra options for the program, e.g.
# "--tokens 2048 --kv-heads 2" for a smoke run; see the option list in main()).
set -euo pipefail

record=0
if [[ "${1:-}" == "--record" ]]; then
  record=1
  shift
fi
# shellcheck source=bench/quality/script_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/script_env.sh"
out=${1:-$root/build-sale-quality}
mkdir -p "$out"

# parallel_for uses std::jthread, so -pthread and no OpenMP.
"$cxx" -std=c++20 -O3 -march=native -DNDEBUG -Wall -Wextra "${includes[@]}" \
  "$root/bench/quality/sale_quality.cpp" -o "$out/sale_quality" -pthread

date_utc=$(date -u +%Y-%m-%d)
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
machine="${cpu:-unknown CPU}, $(nproc) cores"
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git -C "$root" diff --quiet HEAD -- include bench/quality tests/common 2>/dev/null ||
   [[ -n "$(git -C "$root" ls-files --others --exclude-standard -- include bench/quality tests/common 2>/dev/null)" ]]; then
  commit="$commit+uncommitted"
fi

start=$(date +%s)
# shellcheck disable=SC2086
"$out/sale_quality" --threads "$threads" ${SALE_ARGS:-} --out "$out/sale_quality.json" \
  --md "$out/sale_quality_tables.md" \
  --meta "date=$date_utc" --meta "machine=$machine" --meta "commit=$commit" \
  --meta "command=bench/quality/run_sale_quality.sh${SALE_ARGS:+ (SALE_ARGS=$SALE_ARGS)}" 2> >(tee "$out/log.txt" >&2)
echo "wall $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"

# Error vs density, one curve per estimator; plain Python, the SVG written as text.
"$python" - "$out/sale_quality.json" "$out/sale_quality.svg" <<'PY'
import json, math, sys
d = json.load(open(sys.argv[1]))
W, H, px, py, pw, ph = 900, 380, 70, 40, 340, 260
colors = {"sale_int4": "#1f77b4", "sale_int8": "#2ca02c", "mean_pool": "#d62728"}
e = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (W, H),
     '<rect width="100%" height="100%" fill="white"/>']
s = d["setup"]
for panel, (key, title) in enumerate([("l1_mean", "mean row L1 error (mean over heads)"),
                                      ("rel_l2_mean", "relative L2 error (mean over heads)")]):
    x0 = px + panel * (pw + 110)
    vals = [p[key] for r in d["estimators"] for p in r["points"] if p[key] > 0]
    ly0, ly1 = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    fx = lambda v: x0 + v * pw / 0.7
    fy = lambda v: py + ph - (math.log10(v) - ly0) / (ly1 - ly0) * ph
    e.append('<text x="%d" y="%d" font-size="13" font-weight="bold">%s</text>' % (x0, py - 12, title))
    e.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>' % (x0, py, pw, ph))
    for k in range(ly0, ly1 + 1):
        e.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>' % (x0, x0 + pw, fy(10 ** k), fy(10 ** k)))
        e.append('<text x="%d" y="%.1f" text-anchor="end">1e%d</text>' % (x0 - 6, fy(10 ** k) + 4, k))
    for i in range(8):
        v = i / 10
        e.append('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#eee"/>' % (fx(v), fx(v), py, py + ph))
        e.append('<text x="%.1f" y="%d" text-anchor="middle">%.1f</text>' % (fx(v), py + ph + 16, v))
    e.append('<text x="%d" y="%d" text-anchor="middle">density (kept / causal blocks)</text>' % (x0 + pw // 2, py + ph + 34))
    for r in d["estimators"]:
        pts = sorted((p["density"], p[key]) for p in r["points"] if p[key] > 0 and p["density"] <= 0.7)
        col = colors.get(r["name"], "#555")
        e.append('<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>'
                 % (" ".join("%.1f,%.1f" % (fx(a), fy(b)) for a, b in pts), col))
        for a, b in pts:
            e.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (fx(a), fy(b), col))
for i, r in enumerate(d["estimators"]):
    x = px + i * 180
    col = colors.get(r["name"], "#555")
    e.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s" stroke-width="2"/>' % (x, x + 24, H - 22, H - 22, col))
    e.append('<text x="%d" y="%d">%s</text>' % (x + 30, H - 18, r["label"]))
e.append('<text x="%d" y="%d" fill="#555" text-anchor="end">%d tokens, %d q heads, one tau for all heads</text>'
         % (W - 10, H - 18, s["tokens"], s["q_heads"]))
e.append("</svg>")
open(sys.argv[2], "w").write("\n".join(e) + "\n")
PY

if [[ $record == 1 ]]; then
  cp "$out/sale_quality.json" "$root/bench/results/$date_utc-cpu-sale-quality.json"
  cp "$out/sale_quality.svg" "$root/docs/sale_quality.svg"
fi
cat "$out/sale_quality_tables.md"
