# SPDX-License-Identifier: Apache-2.0
"""Torch anchors for bench/residual/residual_gpu_bench.cu, timed on the same device run.

encode: greedy residual encoding of one tensor (K or V) of 8 heads x n tokens,
  d = 128, bf16 rows widened to float: per stage, distances by one matmul
  (||c||^2 - 2 x.c, float32; also with TF32 allowed), argmin, residual minus
  the chosen codeword. Points: 8 stages of 256 (per-head codebooks) and VQKV's
  keys, 56 stages of 1024 (one shared codebook). Tokens go in chunks of 32K so
  the distance matrix stays under a few GB.
attention: one decode step, 32 q / 8 KV heads, n in {32K, 128K}, the same four
  configurations as the C++ benchmark (0: (256x8; 256x8) per-head codebooks,
  1: VQKV (1024x56; 512x16) shared, 2: (256x4; 256x4), 3: (16x16; 16x16)).
  Two formulations:
  lut    LUT by einsum, gather + sum over the key stages, softmax, a
         scatter_add histogram of the probabilities per value stage, one
         einsum with the value codebooks (what the fused kernel computes).
  sdpa   K and V rebuilt from the codes (gather + sum over stages, bf16),
         then torch's scaled_dot_product_attention (GQA) in bf16.
  Codes are kept as int64 indices outside the timed region. Inputs rotate
  among copies that together exceed L2, as in the pqkv benchmark.
Times: CUDA events around each call after warm-up, median of the repetitions
(bench/anchors/timing.py). Prints one JSON document.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

from timing import median_us, utc_now

KV, QH, DIM = 8, 32, 128
CONFIGS = {0: (8, 256, 8, 256, False), 1: (56, 1024, 16, 512, True), 2: (4, 256, 4, 256, False),
           3: (16, 16, 16, 16, False)}


def encode(x, cent, chunk=32768):
    # x [H, n, D] bf16; cent [Hc, stages, ksub, D] float; returns codes [H, n, stages] int64
    h, n, _ = x.shape
    stages = cent.shape[1]
    codes = torch.empty(h, n, stages, device=x.device, dtype=torch.int64)
    norms = (cent * cent).sum(-1)  # [Hc, stages, ksub]
    for t0 in range(0, n, chunk):
        r = x[:, t0:t0 + chunk].float()
        for st in range(stages):
            c = cent[:, st]  # [Hc, ksub, D]
            d = norms[:, st].unsqueeze(1) - 2.0 * torch.matmul(r, c.transpose(-1, -2))
            idx = d.argmin(-1)  # [H, chunk]
            codes[:, t0:t0 + chunk, st] = idx
            r = r - torch.gather(c.expand(h, -1, -1), 1, idx.unsqueeze(-1).expand(-1, -1, c.shape[-1]))
    return codes


def attend_lut(q, kc, vc, kcodes, vcodes, scale):
    # q [QH, D]; kc [Hc, Sk, Kk, D]; vc [Hc, Sv, Kv, D]; kcodes [KV, Sk, n]; vcodes [KV, Sv, n] (int64)
    r = QH // KV
    qg = q.view(KV, r, DIM)
    kcx = kc.expand(KV, -1, -1, -1)
    lut = torch.einsum("grd,gscd->gsrc", qg, kcx)  # [KV, Sk, r, Kk]
    n = kcodes.shape[-1]
    logits = torch.zeros(KV, r, n, device=q.device)
    for st in range(kc.shape[1]):
        logits += lut[:, st].gather(-1, kcodes[:, st].unsqueeze(1).expand(KV, r, n))
    p = torch.softmax(logits * scale, dim=-1)  # [KV, r, n]
    sv, kv_ = vc.shape[1], vc.shape[2]
    hist = torch.zeros(KV, r, sv, kv_, device=q.device)
    for st in range(sv):
        hist[:, :, st].scatter_add_(-1, vcodes[:, st].unsqueeze(1).expand(KV, r, n), p)
    return torch.einsum("grsc,gscd->grd", hist, vc.expand(KV, -1, -1, -1)).reshape(QH, DIM)


def rebuild(c, codes):
    # c [Hc, S, K, D] float; codes [KV, S, n] int64 -> [KV, n, D] bf16
    cx = c.expand(KV, -1, -1, -1)
    out = None
    for st in range(c.shape[1]):
        idx = codes[:, st].unsqueeze(-1).expand(-1, -1, DIM)
        part = torch.gather(cx[:, st], 1, idx)
        out = part if out is None else out + part
    return out.to(torch.bfloat16)


def sdpa(qb, k, v, scale):
    # qb [1, QH, 1, D]; k, v [1, KV, n, D] bf16. GQA natively where torch has it (>= 2.5).
    try:
        return F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=True)
    except TypeError:
        r = QH // KV
        return F.scaled_dot_product_attention(qb, k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1),
                                              scale=scale)


def attend_sdpa(qb, kc, vc, kcodes, vcodes, scale):
    k = rebuild(kc, kcodes).unsqueeze(0)  # [1, KV, n, D]
    v = rebuild(vc, vcodes).unsqueeze(0)
    return sdpa(qb, k, v, scale)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--encode-reps", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    scale = 1.0 / DIM ** 0.5
    results = []

    n = 131072
    for stages, ksub, shared in ((8, 256, False), (56, 1024, True)):
        row = {"kind": "encode", "n": n, "stages": stages, "ksub": ksub, "shared": shared}
        try:
            x = (torch.rand(KV, n, DIM, device=dev) * 2 - 1).to(torch.bfloat16)
            cent = (torch.rand(1 if shared else KV, stages, ksub, DIM, device=dev) * 2 - 1) * 0.5
            for tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                us = median_us(lambda: encode(x, cent), args.encode_reps, warmup=1)
                row["tf32_ms" if tf32 else "fp32_ms"] = us / 1e3
            torch.backends.cuda.matmul.allow_tf32 = False
            del x, cent
        except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
            row["error"] = "out of memory: " + str(e).splitlines()[0]
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()

    for n in (32768, 131072):
        for cfg_id, (sk, kk, sv, kv_, shared) in CONFIGS.items():
            row = {"kind": "attention", "n": n, "config": cfg_id, "key": [kk, sk], "value": [kv_, sv]}
            try:
                hc = 1 if shared else KV
                kc = (torch.rand(hc, sk, kk, DIM, device=dev) * 2 - 1) * 0.3
                vc = (torch.rand(hc, sv, kv_, DIM, device=dev) * 2 - 1) * 0.3
                code_bytes = KV * n * (sk * (1 if kk <= 256 else 2) + sv * (1 if kv_ <= 256 else 2))
                copies = max(1, min(8, (120 << 20) // code_bytes + 1))
                kcodes = [torch.randint(0, kk, (KV, sk, n), device=dev) for _ in range(copies)]
                vcodes = [torch.randint(0, kv_, (KV, sv, n), device=dev) for _ in range(copies)]
                q = torch.rand(QH, DIM, device=dev) * 2 - 1
                qb = q.to(torch.bfloat16).view(1, QH, 1, DIM)
                it = [0]

                def nxt():
                    it[0] += 1
                    return it[0] % copies

                row["torch_lut_us"] = median_us(
                    lambda: attend_lut(q, kc, vc, kcodes[nxt()], vcodes[it[0] % copies], scale), args.reps)
                row["torch_sdpa_us"] = median_us(
                    lambda: attend_sdpa(qb, kc, vc, kcodes[nxt()], vcodes[it[0] % copies], scale), args.reps)
                # the dense floor: bf16 SDPA on K, V already rebuilt
                kd = rebuild(kc, kcodes[0]).unsqueeze(0)
                vd = rebuild(vc, vcodes[0]).unsqueeze(0)
                row["torch_dense_sdpa_us"] = median_us(lambda: sdpa(qb, kd, vd, scale), args.reps)
                del kcodes, vcodes, kd, vd
            except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
                row["error"] = "out of memory: " + str(e).splitlines()[0]
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    doc = {"date": utc_now(), "role": "anchor", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "results": results}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
