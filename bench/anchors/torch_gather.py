# SPDX-License-Identifier: Apache-2.0
"""Torch anchors for bench/offload/offload_bench.cu, timed on the same device run.

Shapes: bf16, d = 128, 8 KV heads, a 128K-token host store of K and V; k rows
per head in {2048, 8192, 26214}, indices random or clustered (runs of 64),
ascending per head, as in the pqkv benchmark.
  torch_index_select  PQCache's way: the selection is on the host (int64),
                      K (and V) are gathered on the CPU with index_select per
                      head into one tensor, then copied with .cuda(). Host
                      stores in pageable and in pinned memory are both timed.
  torch_contiguous    one pinned tensor of the same byte count copied with
                      .cuda(non_blocking=True): the PCIe ceiling.
Times: wall clock around the whole host-side path with a CUDA synchronize at
the end (index_select is host work), after warm-up; median of the
repetitions; the contiguous copy is timed with CUDA events. Bytes are K + V
unless the row says "k_only". Prints one JSON document.
"""
import argparse
import json
import sys
import time

import torch

from timing import median_us, utc_now

KV, DIM, TOKENS = 8, 128, 131072


def indices(k, clustered, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(KV):
        if not clustered:
            idx = torch.randperm(TOKENS, generator=g)[:k]
        else:
            starts = torch.randint(0, TOKENS, (k // 64 + 8,), generator=g)
            idx = (starts[:, None] + torch.arange(64)[None, :]).flatten() % TOKENS
            idx = torch.unique(idx)[:k]
            if idx.numel() < k:  # overlapping runs: top up with random rows
                extra = torch.randperm(TOKENS, generator=g)
                idx = torch.unique(torch.cat([idx, extra]))[:k]
        out.append(torch.sort(idx).values)
    return torch.stack(out)  # [KV, k] int64


def wall_median_us(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    stores = {}
    for pinned in (False, True):
        k_store = torch.randn(KV, TOKENS, DIM, dtype=torch.bfloat16)
        v_store = torch.randn(KV, TOKENS, DIM, dtype=torch.bfloat16)
        if pinned:
            k_store, v_store = k_store.pin_memory(), v_store.pin_memory()
        stores[pinned] = (k_store, v_store)
    results = []
    for k in (2048, 8192, 26214):
        row_bytes = DIM * 2
        kv_bytes = 2 * KV * k * row_bytes
        src = torch.empty(kv_bytes, dtype=torch.uint8).pin_memory()
        src.fill_(1)
        dst = torch.empty(kv_bytes, dtype=torch.uint8, device=dev)
        contiguous = median_us(lambda: dst.copy_(src, non_blocking=True), args.reps)
        results.append({"name": "torch_contiguous", "k": k, "bytes": kv_bytes, "median_us": contiguous,
                        "GBps": kv_bytes / contiguous * 1e-3})
        for clustered in (0, 1):
            idx = indices(k, clustered, 10)
            for pinned in (False, True):
                k_store, v_store = stores[pinned]

                def kv_path():
                    kk = torch.stack([k_store[h].index_select(0, idx[h]) for h in range(KV)])
                    vv = torch.stack([v_store[h].index_select(0, idx[h]) for h in range(KV)])
                    return kk.cuda(), vv.cuda()

                def k_path():
                    kk = torch.stack([k_store[h].index_select(0, idx[h]) for h in range(KV)])
                    return kk.cuda()

                t_kv = wall_median_us(kv_path, args.reps)
                t_k = wall_median_us(k_path, args.reps)
                # The same rows must come out as a plain gather would give.
                kk, _ = kv_path()
                ok = bool(torch.equal(kk[3].cpu(), k_store[3][idx[3]]))
                for name, t, b in (("torch_index_select", t_kv, kv_bytes),
                                   ("torch_index_select_k_only", t_k, kv_bytes // 2)):
                    row = {"name": name, "k": k, "clustered": clustered, "pinned_store": pinned, "bytes": b,
                           "median_us": t, "GBps": b / t * 1e-3, "rows_ok": ok}
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    doc = {"date": utc_now(), "role": "anchor", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cpu_threads": torch.get_num_threads(), "results": results}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
