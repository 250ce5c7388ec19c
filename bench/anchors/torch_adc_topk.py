# SPDX-License-Identifier: Apache-2.0
"""Torch anchors for bench/score/adc_topk_bench.cu, timed on the same device run.

For each configuration (batch, n, m, nbits, k; 8 KV heads, 32 q heads, d = 128,
4 sink + 64 window tokens, PQCache's softmax_sum aggregation):
  torch_pq    LUT by einsum, gather of the LUT over the codes, sum over the
              subspaces, softmax per q head over the candidates, sum over the
              group, torch.topk. Two formulations are timed and the faster one
              is reported: one gather over all subspaces at once (flattened
              LUT), and a loop of per-subspace gathers; codes are kept as int64
              indices outside the timed region (what a torch user would store).
  torch_exact exact bf16 q @ K^T, the same softmax_sum, torch.topk.
topk is unsorted (the pqkv call also sorts its output by token index; torch
is not charged for that). Times: CUDA events around each call, after warm-up,
median of the repetitions; inputs rotate among copies that together exceed
L2, as in the pqkv benchmark. Prints one JSON document.
"""
import argparse
import json
import sys

import torch

from timing import median_us, utc_now

KV, QH, DIM, SINK, WINDOW = 8, 32, 128, 4, 64


def softmax_sum_topk(logits, k):
    # logits [B, KV, r, n] float -> indices of the k best candidates per (B, KV)
    n = logits.shape[-1]
    cand = logits[..., SINK:n - WINDOW]
    scores = torch.softmax(cand, dim=-1).sum(dim=2)
    return torch.topk(scores, k, dim=-1, sorted=False).indices


def pq_flat(q, centroids, codes_flat, m, ksub, scale, k):
    # q [B, QH, DIM]; centroids [KV, m, ksub, dsub]; codes_flat [B, KV, 1, n*m] int64 (code + j*ksub)
    b = q.shape[0]
    r = QH // KV
    qs = q.view(b, KV, r, m, DIM // m)
    lut = torch.einsum("bgrjd,gjcd->bgrjc", qs, centroids).reshape(b, KV, r, m * ksub)
    idx = codes_flat.expand(b, KV, r, codes_flat.shape[-1])
    logits = lut.gather(-1, idx).view(b, KV, r, -1, m).sum(-1) * scale
    return softmax_sum_topk(logits, k)


def pq_loop(q, centroids, codes_l, m, ksub, scale, k):
    # codes_l [B, KV, m, 1, n] int64
    b = q.shape[0]
    r = QH // KV
    n = codes_l.shape[-1]
    qs = q.view(b, KV, r, m, DIM // m)
    lut = torch.einsum("bgrjd,gjcd->bgrjc", qs, centroids)  # [B, KV, r, m, ksub]
    logits = torch.zeros(b, KV, r, n, device=q.device)
    for j in range(m):
        logits += lut[:, :, :, j, :].gather(-1, codes_l[:, :, j].expand(b, KV, r, n))
    return softmax_sum_topk(logits * scale, k)


def exact(qb, keys, scale, k):
    # qb [B, KV, r, DIM] bf16; keys [B, KV, n, DIM] bf16
    logits = torch.matmul(qb, keys.transpose(-1, -2)).float() * scale
    return softmax_sum_topk(logits, k)


def configs():
    out = []
    for batch in (1, 8):
        for n in (32768, 131072, 1048576):
            for m in (2, 4, 8, 16):
                for k in (2048, 0):
                    out.append((batch, n, m, 8, k))
    for n in (32768, 131072, 1048576):
        out.append((1, n, 2, 6, 0))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="only n <= 128K")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    scale = 1.0 / DIM ** 0.5
    results = []
    exact_cache = {}
    for batch, n, m, nbits, k_arg in configs():
        if args.quick and n > 131072:
            continue
        k = k_arg if k_arg > 0 else n // 5
        ksub = 1 << nbits
        code_bytes = batch * KV * n * m
        copies = max(1, min(8, (160 << 20) // code_bytes + 1))
        row = {"batch": batch, "n": n, "m": m, "nbits": nbits, "k": k}
        centroids = qs = codes = None
        try:
            centroids = torch.rand(KV, m, ksub, DIM // m, device=dev) * 2 - 1
            qs = [torch.rand(batch, QH, DIM, device=dev) * 2 - 1 for _ in range(copies)]
            codes = [torch.randint(0, ksub, (batch, KV, n, m), device=dev, dtype=torch.uint8) for _ in range(copies)]
            offs = (torch.arange(m, device=dev) * ksub).view(1, 1, 1, m)
            flat_bytes = batch * KV * (QH // KV) * n * m * 4
            it = [0]

            def nxt():
                it[0] += 1
                return it[0] % copies

            variants = {}
            if flat_bytes <= (3 << 30):
                flat = [(c.long() + offs).view(batch, KV, 1, n * m) for c in codes]
                variants["flat"] = median_us(lambda: pq_flat(qs[nxt()], centroids, flat[it[0] % copies], m, ksub,
                                                             scale, k), args.reps)
                del flat
            loop = [c.long().permute(0, 1, 3, 2).unsqueeze(3).contiguous() for c in codes]
            variants["loop"] = median_us(lambda: pq_loop(qs[nxt()], centroids, loop[it[0] % copies], m, ksub, scale,
                                                         k), args.reps)
            del loop
            best = min(variants, key=variants.get)
            row["torch_pq_us"] = variants[best]
            row["torch_pq_variant"] = best
            row["torch_pq_variants_us"] = variants
            key = (batch, n, k)
            if key not in exact_cache:
                keys = torch.randn(batch, KV, n, DIM, device=dev, dtype=torch.bfloat16)
                qb = (torch.rand(batch, KV, QH // KV, DIM, device=dev) * 2 - 1).to(torch.bfloat16)
                exact_cache[key] = median_us(lambda: exact(qb, keys, scale, k), args.reps)
                del keys, qb
            row["torch_exact_us"] = exact_cache[key]
        except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
            row["error"] = "out of memory: " + str(e).splitlines()[0]
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del centroids, qs, codes
        torch.cuda.empty_cache()
    doc = {"date": utc_now(), "role": "anchor", "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
