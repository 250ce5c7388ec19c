#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Renders a quality sweep's JSON (bench/quality/quality_sweep.cpp) as a
Markdown table and an SVG plot of the quality-vs-bytes frontier.

    report_quality.py quality.json quality.md quality_vs_bytes.svg

Plain Python, no plotting library: the SVG is written as text.
"""
import json
import math
import sys


def k_label(k, n):
    return "n/5 = %d" % k if k == n // 5 else str(k)


def markdown(d):
    s = d["setup"]
    n = s["tokens"]
    kv = s["kv_bf16_bytes_per_token_head"]
    ceil = {c["k"]: c for c in d["ceilings"]}
    out = ["<!-- SPDX-License-Identifier: Apache-2.0 -->",
           "# %s: quality vs memory of PQ token selection, CPU" % d.get("date", "?"), "",
           "- Machine: %s. Commit `%s`. Command: `%s`." % (d.get("machine", "?"), d.get("commit", "?"),
                                                        d.get("command", "?")),
           "- Keys, values and queries: `tests/common/keygen.hpp` defaults (RoPE with Llama 3.1 scaling, "
           "low-rank keys, outlier channels, 4 attention sinks, topic clumps, 16 needles per KV head of "
           "nominal logit 6..24), seed %d; %d tokens, %d KV heads, %d q heads, d = %d; %d decode queries, "
           "each issued at position n (the step number varies topic, content and needle target), all "
           "%d q heads each." % (s["generator_seed"], n, s["kv_heads"], s["q_heads"], s["dim"], s["queries"],
                                 s["q_heads"]),
           "- Selection: `pqkv::cpu::adc_topk<gqa::softmax_sum>` over the codes, top-k per KV head, plus "
           "sink %d and window %d always attended; the ceiling is `pqkv::cpu::exact_topk` with the same "
           "aggregation, sink and window." % (s["sink"], s["window"]),
           "- Codebooks: `pqkv::cpu::kmeans_trainer`, k-means++ init, %d iterations (tol 0), trained per "
           "(KV head, subspace) on a seeded subsample of %d of the %d tokens (to keep the CPU run short; "
           "every token is then encoded), seed %d." % (s["kmeans_iters"], s["train_points"], n, s["pq_seed"]),
           "- Metrics (`include/pqkv/attend/metrics.hpp`): attention mass = share of the exact softmax "
           "probability over all n tokens that falls on the attended tokens, per q head; mean and 5th "
           "percentile over q heads x queries. Recall@k = |selected ∩ exact top-k| / k per KV head. "
           "Error = ||o_sparse - o_dense|| / ||o_dense|| per q head (mean). Needle hit rate: of the "
           "(query, KV head) pairs whose queries aim at a planted needle, the share whose needle is "
           "attended. Bytes: uint8 codes per token and KV head (m, whatever nbits); bf16 K+V is %d B. "
           "The codebook adds 4 x 2^nbits x d bytes per KV head (%.2f B per token at n = %d for 8 bits)."
           % (kv, 4 * 256 * s["dim"] / n, n),
           "- Goals from the issue, at each k: mass >= 0.97 x the exact top-k's; error <= 1.5 x the "
           "exact top-k's + 0.02.",
           "- %d threads; whole run %.0f s." % (s["threads"], d["total_s"]),
           ""]
    out.append("| selection | B/token/head | % of bf16 K+V | k | mass mean | mass p5 | mass / exact | "
               "recall@k | error vs dense | error goal | needles hit | select (CPU) | train+encode |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in sorted(ceil):
        c = ceil[k]
        out.append("| exact top-k (ceiling) | - | - | %s | %.4f | %.4f | 1 | 1 | %.4f | - | %d/%d | - | - |"
                   % (k_label(k, n), c["mass_mean"], c["mass_p5"], c["err_mean"], c["needle_hits"],
                      c["needle_queries"]))
        for r in d["rows"]:
            if r["k"] != k:
                continue
            goal = 1.5 * c["err_mean"] + 0.02
            ratio = r["mass_mean"] / c["mass_mean"]
            out.append("| PQ (%d, %d) | %d | %.2f%% | %s | %.4f | %.4f | %.3f%s | %.3f | %.4f | %s (<= %.3f) | "
                       "%d/%d | %.0f ms | %.0f s |"
                       % (r["m"], r["nbits"], r["code_bytes_per_token_head"],
                          100.0 * r["code_bytes_per_token_head"] / kv, k_label(k, n), r["mass_mean"],
                          r["mass_p5"], ratio, "" if ratio >= 0.97 else " (below 0.97)", r["recall_mean"],
                          r["err_mean"], "met" if r["err_mean"] <= goal else "missed", goal, r["needle_hits"],
                          r["needle_queries"], r["select_ms"], r["train_encode_s"]))
    out.append("")
    return "\n".join(out)


def svg(d):
    n = d["setup"]["tokens"]
    ceil = {c["k"]: c for c in d["ceilings"]}
    ks = sorted(ceil)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    W, H = 980, 380
    pw, ph = 380, 260
    panels = [(70, 40, "attention mass captured", "mass"), (560, 40, "output error vs dense", "err")]
    xs = sorted({r["code_bytes_per_token_head"] for r in d["rows"]})
    lx0, lx1 = math.log2(min(xs)) - 0.5, math.log2(max(xs)) + 0.5
    e = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" '
         'font-size="12">' % (W, H), '<!-- SPDX-License-Identifier: Apache-2.0 -->',
         '<rect width="100%" height="100%" fill="white"/>']
    for px, py, title, key in panels:
        if key == "mass":
            vals = [r["mass_p5"] for r in d["rows"]] + [r["mass_mean"] for r in d["rows"]]
            vals += [c["mass_p5"] for c in ceil.values()] + [c["mass_mean"] for c in ceil.values()]
            y0, y1 = math.floor(min(vals) * 10) / 10, 1.0
        else:
            vals = [r["err_mean"] for r in d["rows"]] + [c["err_mean"] for c in ceil.values()]
            y0, y1 = 0.0, math.ceil(max(vals) * 10) / 10
        fx = lambda b: px + (math.log2(b) - lx0) / (lx1 - lx0) * pw
        fy = lambda v: py + ph - (v - y0) / (y1 - y0) * ph
        e.append('<text x="%d" y="%d" font-size="14" font-weight="bold">%s</text>' % (px, py - 12, title))
        e.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>' % (px, py, pw, ph))
        steps = 5
        for i in range(steps + 1):
            v = y0 + (y1 - y0) * i / steps
            e.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>' % (px, px + pw, fy(v), fy(v)))
            e.append('<text x="%d" y="%.1f" text-anchor="end">%.2f</text>' % (px - 6, fy(v) + 4, v))
        for b in xs:
            e.append('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#eee"/>' % (fx(b), fx(b), py, py + ph))
            e.append('<text x="%.1f" y="%d" text-anchor="middle">%d</text>' % (fx(b), py + ph + 16, b))
        e.append('<text x="%d" y="%d" text-anchor="middle">code bytes per token and KV head (log scale; '
                 'bf16 K+V: 512)</text>' % (px + pw // 2, py + ph + 34))
        for i, k in enumerate(ks):
            col = colors[i % len(colors)]
            rows = sorted((r for r in d["rows"] if r["k"] == k), key=lambda r: r["code_bytes_per_token_head"])
            series = [("mass_mean", "", 2.0), ("mass_p5", "5,4", 1.2)] if key == "mass" else [("err_mean", "", 2.0)]
            for field, dash, width in series:
                pts = " ".join("%.1f,%.1f" % (fx(r["code_bytes_per_token_head"]), fy(r[field])) for r in rows)
                e.append('<polyline points="%s" fill="none" stroke="%s" stroke-width="%.1f"%s/>'
                         % (pts, col, width, ' stroke-dasharray="%s"' % dash if dash else ""))
                for r in rows:
                    e.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>'
                             % (fx(r["code_bytes_per_token_head"]), fy(r[field]), col))
                cy = fy(ceil[k][field])
                e.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="%s" stroke-dasharray="2,3" '
                         'stroke-width="%.1f"/>' % (px, px + pw, cy, cy, col, width * 0.7))
            if key == "mass":
                for r in rows:
                    e.append('<text x="%.1f" y="%.1f" text-anchor="middle" font-size="10" fill="#555">(%d,%d)</text>'
                             % (fx(r["code_bytes_per_token_head"]), fy(r["mass_mean"]) - 7 - 12 * i, r["m"],
                                r["nbits"]))
    ly = H - 26
    for i, k in enumerate(ks):
        col = colors[i % len(colors)]
        x = 70 + i * 200
        e.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s" stroke-width="2"/>' % (x, x + 24, ly, ly, col))
        e.append('<text x="%d" y="%d">PQ, k = %s</text>' % (x + 30, ly + 4, k_label(k, n)))
    e.append('<text x="%d" y="%d">solid: mean, dashed: 5th pct., dotted: exact top-k; '
             '(m, nbits) at points</text>' % (70 + 200 * len(ks), ly + 4))
    e.append("</svg>")
    return "\n".join(e) + "\n"


def main():
    with open(sys.argv[1]) as f:
        d = json.load(f)
    with open(sys.argv[2], "w") as f:
        f.write(markdown(d))
    with open(sys.argv[3], "w") as f:
        f.write(svg(d))


if __name__ == "__main__":
    main()
