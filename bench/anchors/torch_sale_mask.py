# SPDX-License-Identifier: Apache-2.0
"""Torch anchors for bench/sparse/sale_mask_gpu_bench.cu, timed on the same device run.

For each n (one sequence, 32 q / 8 KV heads, d = 128, bf16, Bq = 64, Bk = 32,
sink 32, local 128, tau 0.004, SALE's 4-bit grid per token):
  torch_mask   the SALE mask in torch: centre Q and K on their token means,
               quantize per token to int8 codes in [-7, 7], the corrections
               q_mean.k'_j and q_i.k_mean, exact float logits over the forced
               keys (sink blocks + the local window of each q block) for m_i
               and l_i, then the estimate by torch._int_mm over the causal
               key prefix of each chunk of rows (the 4 q heads of a KV head
               stacked), the keep rule z~ >= m_i + ln(tau l_i) per element, and
               the OR over 64 x 32 blocks.
  sdpa_dense   dense causal attention, torch SDPA (flash backend where
               available), the reference cost the issue compares the mask with.
  flex_sparse  (when FlexAttention works here) torch flex_attention fed the
               torch mask OR-reduced to 128 x 128 blocks as BlockMask tensors.
Times: CUDA events around each call, after warm-up, median of the repetitions.
Prints one JSON document (and writes it to --out when given).
"""
import argparse
import json
import math
import sys

import torch

from timing import median_us, utc_now

QH, KV, D, BQ, BK, SINK, LOCAL, TAU = 32, 8, 128, 64, 32, 32, 128, 0.004


def make_inputs(n, device):
    g = torch.Generator(device=device).manual_seed(1)
    u = torch.rand(D, device=device, generator=g) * 2 - 1
    q = 4 * (torch.rand(QH, n, D, device=device, generator=g) * 2 - 1)
    q += 0.5 * (torch.rand(QH, 1, D, device=device, generator=g) * 2 - 1) + 0.3 * u
    k = torch.rand(KV, n, D, device=device, generator=g) * 2 - 1
    k += 0.5 * (torch.rand(KV, 1, D, device=device, generator=g) * 2 - 1) + 0.3 * u
    k[:, :4] += 2.2 * u
    v = torch.rand(KV, n, D, device=device, generator=g) * 2 - 1
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def quantize(x, qmax=7):
    xf = x.float()
    mean = xf.mean(dim=1, keepdim=True)
    xc = xf - mean
    amax = xc.abs().amax(dim=2, keepdim=True)
    scale = amax / qmax
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    codes = torch.round(xc * inv).clamp(-qmax, qmax).to(torch.int8)
    return codes, scale.squeeze(-1), mean


def forced_lse(q, k, n, scale):
    """lse_i over the sink blocks and the local window of each row's q block: [QH, n]."""
    r = QH // KV
    nq = (n + BQ - 1) // BQ
    qb = torch.arange(nq, device=q.device)
    q_end = torch.clamp((qb + 1) * BQ, max=n)
    kl = torch.clamp(torch.div(q_end - LOCAL, BK, rounding_mode="floor"), min=0)
    w = LOCAL + BQ + BK
    start = torch.maximum(kl * BK, torch.full_like(kl, SINK))  # sink keys are counted separately
    keys = start[:, None] + torch.arange(w, device=q.device)[None, :]  # [nq, w]
    rows = torch.arange(n, device=q.device)
    lse = torch.empty(QH, n, device=q.device)
    kf = k.float()
    qf = q.float()
    chunk = 16  # q blocks per step: the gathered keys stay near 1 GB at d = 128
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        r0, r1 = c0 * BQ, min(n, c1 * BQ)
        kk = keys[c0:c1]  # [c, w]
        ridx = rows[r0:r1]
        blk = torch.div(ridx, BQ, rounding_mode="floor") - c0
        keys_r = kk[blk]  # [rows, w]
        valid = (keys_r <= ridx[:, None]) & (keys_r < n)
        kg = kf[:, keys_r.clamp(max=n - 1)]  # [KV, rows, w, D]
        qq = qf[:, r0:r1].view(KV, r, r1 - r0, D)
        loc = torch.einsum("grid,giwd->griw", qq, kg).reshape(QH, r1 - r0, w) * scale
        loc = loc.masked_fill(~valid[None], float("-inf"))
        sink_keys = torch.arange(SINK, device=q.device)
        sk = torch.einsum("grid,gjd->grij", qq, kf[:, :SINK]).reshape(QH, r1 - r0, SINK) * scale
        sk = sk.masked_fill(~(sink_keys[None, :] <= ridx[:, None])[None], float("-inf"))
        lse[:, r0:r1] = torch.logsumexp(torch.cat([sk, loc], dim=-1), dim=-1)
    return lse


INT_MM = {"path": "torch._int_mm"}


def int8_dot(a, b_t):
    """a [m, d] int8 @ b_t [d, n] int8 -> int32; torch._int_mm where it runs, else
    a float matmul of the int8 values (exact: |dot| < 2^24)."""
    if INT_MM["path"] == "torch._int_mm":
        try:
            return torch._int_mm(a, b_t)
        except RuntimeError as e:
            INT_MM["path"] = "float matmul of int8 values"
            INT_MM["why"] = str(e)[:200]
    return (a.float() @ b_t.float()).int()


def torch_mask(q, k, n, tau=TAU, rows_per_chunk=512):
    scale = 1.0 / math.sqrt(D)
    r = QH // KV
    qc, qs, qm = quantize(q)
    kc, ks, km = quantize(k)
    kcent = k.float() - km
    corr = torch.einsum("grd,gjd->grj", qm[:, 0].view(KV, r, D), kcent).reshape(QH, n)  # q_mean . k'_j
    rowt = torch.einsum("grid,gd->gri", q.float().view(KV, r, n, D), km[:, 0]).reshape(QH, n)  # q_i . k_mean
    lse = forced_lse(q, k, n, scale)
    thr = lse + math.log(tau)
    nq, nk = (n + BQ - 1) // BQ, (n + BK - 1) // BK
    mask = torch.zeros(QH, nq, nk, dtype=torch.bool, device=q.device)
    for g in range(KV):
        hs = slice(g * r, (g + 1) * r)
        for r0 in range(0, n, rows_per_chunk):
            r1 = min(n, r0 + rows_per_chunk)
            kend = (r1 + BK - 1) // BK * BK
            kend_c = min(kend, n)
            a = qc[hs, r0:r1].reshape(-1, D)
            dot = int8_dot(a, kc[g, :kend_c].t())  # [r * rows, keys] int32
            dot = dot.view(r, r1 - r0, kend_c).float()
            z = (qs[hs, r0:r1, None] * ks[g, None, None, :kend_c] * dot + corr[hs, None, :kend_c]
                 + rowt[hs, r0:r1, None]) * scale
            ii = torch.arange(r0, r1, device=q.device)[:, None]
            jj = torch.arange(kend_c, device=q.device)[None, :]
            keep = (z >= thr[hs, r0:r1, None]) & (jj <= ii)
            if kend_c < kend:
                keep = torch.nn.functional.pad(keep, (0, kend - kend_c))
            rb = (r1 - r0 + BQ - 1) // BQ
            if (r1 - r0) % BQ:
                keep = torch.nn.functional.pad(keep, (0, 0, 0, rb * BQ - (r1 - r0)))
            blocks = keep.view(r, rb, BQ, kend // BK, BK).any(dim=4).any(dim=2)
            q0 = r0 // BQ
            mask[hs, q0:q0 + rb, :kend // BK] |= blocks
    # forced blocks: sink and local window (the estimate above already covers them mostly)
    qb = torch.arange(nq, device=q.device)[:, None]
    kb = torch.arange(nk, device=q.device)[None, :]
    q_end = torch.clamp((qb + 1) * BQ, max=n)
    causal = kb * BK < q_end
    forced = causal & ((kb * BK < SINK) | ((kb + 1) * BK > q_end - LOCAL))
    return (mask & causal) | forced, causal


def block_mask_tensors(mask, n, cq=128, ck=128):
    fq, fk = cq // BQ, ck // BK
    nq, nk = mask.shape[1], mask.shape[2]
    pq, pk = (-nq) % fq, (-nk) % fk
    m = torch.nn.functional.pad(mask, (0, pk, 0, pq))
    m = m.view(QH, (nq + pq) // fq, fq, (nk + pk) // fk, fk).any(4).any(2)
    num = m.sum(-1).int()
    idx = torch.argsort((~m).int(), dim=-1, stable=True).int()
    return num[None], idx[None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "utc": utc_now(),
           "shape": {"q_heads": QH, "kv_heads": KV, "dim": D, "block_q": BQ, "block_k": BK, "sink": SINK,
                     "local": LOCAL, "tau": TAU, "grid": 7}, "results": []}
    for n in args.n:
        q, k, v = make_inputs(n, dev)
        row = {"n": n}
        mask, causal = torch_mask(q, k, n)
        row["density"] = float(mask.sum() / (causal.sum() * QH))
        reps = max(2, args.reps if n <= 65536 else args.reps // 2)
        row["torch_mask_us"] = median_us(lambda: torch_mask(q, k, n), reps, warmup=1)
        qd, kd, vd = q[None], k[None], v[None]
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        except Exception:  # older torch: default backend choice
            import contextlib
            ctx = contextlib.nullcontext()
        kr, vr = kd.repeat_interleave(QH // KV, dim=1), vd.repeat_interleave(QH // KV, dim=1)
        with ctx:
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kr, vr, is_causal=True)
            row["sdpa_dense_us"] = median_us(sdpa, reps, warmup=2)
        row["dense_flop"] = 4.0 * QH * D * n * (n + 1) / 2
        row["mask_over_dense"] = row["torch_mask_us"] / row["sdpa_dense_us"]
        if not args.no_flex:
            try:
                from torch.nn.attention.flex_attention import BlockMask, flex_attention

                def causal_mod(b, h, qi, ki):
                    return qi >= ki

                num, idx = block_mask_tensors(mask, n)
                bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=128, mask_mod=causal_mod)
                flex = torch.compile(flex_attention)
                fn = lambda: flex(qd, kr, vr, block_mask=bm)
                row["flex_sparse_us"] = median_us(fn, reps, warmup=2)
                nc = (n + 127) // 128
                row["consumer_density_128"] = float(num.sum()) / float(QH * nc * (nc + 1) // 2)
            except Exception as e:  # report, keep the other numbers
                row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
        row["estimate_path"] = dict(INT_MM)
        out["results"].append(row)
        print(json.dumps(row), file=sys.stderr)
        del q, k, v, mask
        torch.cuda.empty_cache()
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
