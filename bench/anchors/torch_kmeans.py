# SPDX-License-Identifier: Apache-2.0
"""Torch anchors for bench/codebook/kmeans_gpu_bench.cu, timed on the same device run.

One layer: 8 KV heads, d = 128, float32 keys from the benchmark's closed form
    keys(h, t, c) = sin(u (0.5 + 0.01 c) + 0.37 h + 0.11 c) + 0.25 sin(0.001 t (1 + c mod 5)),
    u = (t mod 9973) * 0.618034
(the same data as the pqkv benchmark, up to the rounding of sin).

torch_kmeans  batched Lloyd k-means over all (head, subspace) problems at
              once, the same init (centroid k = training row k * n / ksub) and
              the same work as the pqkv call: the permute of the keys into
              [P, n, dsub], then 21 assignment passes (distances
              ||c||^2 - 2 x.c by baddbmm, argmin; the last one gives the
              final MSE) and 20 updates (scatter_add of sums and counts,
              divide; empty clusters keep their centroid). fp32 matmul (TF32
              off, torch's default for matmul). At 1M tokens the distance
              matrix is built in chunks of 131072 rows.
torch_encode  one assignment pass of the layer's keys to given centroids,
              codes returned as uint8 [heads, tokens, m].
Times: CUDA events around each call after a warm-up, median of the
repetitions. Prints one JSON document (and writes it to --out).
"""
import argparse
import json
import sys

import torch

from timing import median_us, utc_now

HEADS, DIM = 8, 128
CHUNK = 131072


def make_keys(n, device):
    t = torch.arange(n, device=device, dtype=torch.int64)
    c = torch.arange(DIM, device=device, dtype=torch.int64)
    h = torch.arange(HEADS, device=device, dtype=torch.int64)
    cf = c.to(torch.float32)
    u = (t % 9973).to(torch.float32) * 0.618034
    a = u[None, :, None] * (0.5 + 0.01 * cf)[None, None, :] + (0.37 * h.to(torch.float32))[:, None, None] \
        + (0.11 * cf)[None, None, :]
    b = (t.to(torch.float32) * 0.001)[:, None] * (1 + c % 5).to(torch.float32)[None, :]
    return torch.sin(a) + 0.25 * torch.sin(b)[None, :, :]


def to_problems(keys, m):
    # [heads, n, dim] -> [heads * m, n, dsub]
    hh, n, d = keys.shape
    return keys.view(hh, n, m, d // m).permute(0, 2, 1, 3).reshape(hh * m, n, d // m).contiguous()


def assign(x, c):
    # x [P, n, dsub], c [P, ksub, dsub] -> (codes [P, n] int64, objective sum float64)
    cn = (c * c).sum(-1)
    xn = (x * x).sum(-1)
    codes = torch.empty(x.shape[:2], dtype=torch.int64, device=x.device)
    obj = torch.zeros((), dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[1], CHUNK):
        xs = x[:, r0:r0 + CHUNK]
        d = torch.baddbmm(cn[:, None, :], xs, c.transpose(1, 2), alpha=-2.0)
        best, idx = d.min(-1)
        codes[:, r0:r0 + CHUNK] = idx
        obj += (best + xn[:, r0:r0 + CHUNK]).clamp_min(0).sum(dtype=torch.float64)
    return codes, obj


def lloyd(keys, m, ksub, iters):
    x = to_problems(keys, m)
    p, n, dsub = x.shape
    rows = (torch.arange(ksub, device=x.device) * n) // ksub
    c = x[:, rows, :].clone()
    ones = torch.ones(p, n, device=x.device)
    codes, obj = assign(x, c)
    for _ in range(iters):
        sums = torch.zeros_like(c).scatter_add_(1, codes[..., None].expand(-1, -1, dsub), x)
        cnt = torch.zeros(p, ksub, device=x.device).scatter_add_(1, codes, ones)
        c = torch.where(cnt[..., None] > 0, sums / cnt.clamp_min(1)[..., None], c)
        codes, obj = assign(x, c)
    return c, obj / (HEADS * n)


def encode(keys, c, m):
    x = to_problems(keys, m)
    codes, _ = assign(x, c)
    n = keys.shape[1]
    return codes.view(HEADS, m, n).permute(0, 2, 1).to(torch.uint8).contiguous()


def median_ms(fn, reps, warmup=1):
    return median_us(fn, reps, warmup) / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32768,131072,1048576")
    ap.add_argument("--m", default="2,8,16")
    ap.add_argument("--bits", default="6,8")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big-reps", type=int, default=1, help="repetitions at >= 1M tokens")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    results = {"date": utc_now(), "role": "anchor", "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "heads": HEADS, "dim": DIM,
               "iters": args.iters, "train": [], "encode": []}
    for n in [int(v) for v in args.tokens.split(",")]:
        keys = make_keys(n, dev)
        reps = args.reps if n < 1048576 else args.big_reps
        for m in [int(v) for v in args.m.split(",")]:
            for bits in [int(v) for v in args.bits.split(",")]:
                ksub = 1 << bits
                out = {}

                def run():
                    out["c"], out["mse"] = lloyd(keys, m, ksub, args.iters)

                big = n >= 1048576  # warm already; one timed call
                t = median_ms(run, reps, warmup=0 if big else 1)
                results["train"].append({"tokens": n, "m": m, "bits": bits, "median_ms": t,
                                         "mse": float(out["mse"])})
                c = out["c"]
                te = median_ms(lambda: encode(keys, c, m), 3 if big else 5)
                results["encode"].append({"tokens": n, "m": m, "bits": bits, "median_ms": te})
                print(f"n={n} m={m} bits={bits}: train {t:.1f} ms (mse {float(out['mse']):.5f}), encode {te:.2f} ms",
                      file=sys.stderr, flush=True)
                del out, c
                torch.cuda.empty_cache()
        del keys
        torch.cuda.empty_cache()
    doc = json.dumps(results, indent=1)
    print(doc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(doc)


if __name__ == "__main__":
    main()
