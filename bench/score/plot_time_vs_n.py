#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Plots gpu::adc_topk time against the sequence length from a benchmark JSON
(and the torch PQ anchor from the same run) as a standalone SVG, linear axes,
so linear growth shows as a straight line.

usage: plot_time_vs_n.py PQKV_JSON TORCH_JSON OUT_SVG
"""
import json
import re
import sys

NAME = re.compile(r"<pqkv::gqa::(\w+)>/batch:(\d+)/n:(\d+)/m:(\d+)/nbits:(\d+)/k:(\d+)/bpsm:4/")


def series(pqkv, torch):
    anchor = {(r["batch"], r["n"], r["m"], r["nbits"], r["k"]): r["torch_pq_us"] for r in torch["results"]}
    out = {}
    for b in pqkv["benchmarks"]:
        m = NAME.search(b["name"])
        if not m or m.group(1) != "softmax_sum" or m.group(5) != "8" or m.group(6) != "0":
            continue
        batch, n, mm = int(m.group(2)), int(m.group(3)), int(m.group(4))
        k = int(b["k"])
        out.setdefault((batch, mm), []).append((n, b["graph_median_us"], anchor.get((batch, n, mm, 8, k))))
    return {key: sorted(v) for key, v in out.items()}


def svg(data, title):
    W, H, px, py, pw, ph = 1180, 420, 80, 50, 560, 300
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    xmax = max(n for v in data.values() for n, _, _ in v)
    ymax = max(t for v in data.values() for _, t, _ in v) * 1.1
    fx = lambda n: px + n / xmax * pw
    fy = lambda t: py + ph - t / ymax * ph
    e = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">'
         % (W, H), "<!-- SPDX-License-Identifier: Apache-2.0 -->", '<rect width="100%" height="100%" fill="white"/>',
         '<text x="%d" y="%d" font-size="14" font-weight="bold">%s</text>' % (px, py - 20, title),
         '<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>' % (px, py, pw, ph)]
    for i in range(6):
        t = ymax * i / 5
        e.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>' % (px, px + pw, fy(t), fy(t)))
        e.append('<text x="%d" y="%.1f" text-anchor="end">%.0f</text>' % (px - 6, fy(t) + 4, t))
    for n in sorted({n for v in data.values() for n, _, _ in v}):
        e.append('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#eee"/>' % (fx(n), fx(n), py, py + ph))
        e.append('<text x="%.1f" y="%d" text-anchor="middle">%dK</text>' % (fx(n), py + ph + 16, n // 1024))
    e.append('<text x="%d" y="%d" text-anchor="middle">tokens per sequence (linear)</text>'
             % (px + pw // 2, py + ph + 36))
    e.append('<text x="%d" y="%d" transform="rotate(-90 %d %d)" text-anchor="middle">us per call (CUDA graph)</text>'
             % (px - 50, py + ph // 2, px - 50, py + ph // 2))
    for i, ((batch, m), pts) in enumerate(sorted(data.items())):
        col = colors[i % len(colors)]
        e.append('<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>'
                 % (" ".join("%.1f,%.1f" % (fx(n), fy(t)) for n, t, _ in pts), col))
        for n, t, a in pts:
            e.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (fx(n), fy(t), col))
        ly = py + 14 + 18 * i
        e.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s" stroke-width="2"/>'
                 % (px + pw + 20, px + pw + 44, ly, ly, col))
        ratios = ", ".join("%.0fx" % (a / t) for n, t, a in pts if a)
        e.append('<text x="%d" y="%d">batch %d, m = %d (torch PQ / pqkv: %s)</text>'
                 % (px + pw + 50, ly + 4, batch, m, ratios))
    e.append("</svg>")
    return "\n".join(e) + "\n"


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        pqkv = json.load(f)
    with open(sys.argv[2]) as f:
        torch = json.load(f)
    data = series(pqkv, torch)
    title = "gpu::adc_topk, softmax_sum, 8 KV heads x 32 q heads, 8 bits, k = n/5 (%s)" % torch.get("device", "")
    with open(sys.argv[3], "w") as f:
        f.write(svg(data, title))


if __name__ == "__main__":
    main()
