# SPDX-License-Identifier: Apache-2.0
"""faiss anchor for pqkv's CPU k-means (bench/run_kmeans_vs_faiss.sh runs it).

Reads the keys that pqkv's benchmark wrote (keys.npy, [tokens, dim] float32)
and trains faiss on them per configuration the way faiss trains a PQ: one
faiss Clustering per subspace (IndexFlatL2 assignment, BLAS distances),
cp.niter iterations, max_points_per_centroid raised so faiss uses every token
as pqkv does. Two runs per configuration:
  own init   faiss.ProductQuantizer.train itself (faiss's random init);
  same init  faiss.Clustering per subspace started from pqkv's initial
             centroids (pqkv_init_m<m>_nbits<nbits>.npy), so the two final
             MSEs differ only by the algorithms, not by the draw of the init.
Both faiss codebooks and pqkv's (pqkv_m<m>_nbits<nbits>.npy) are scored by the
same float64 code: MSE = mean over tokens of the sum over subspaces of the
squared distance to the nearest centroid.

Usage: faiss_kmeans.py DIR [--configs 2:6,2:8] [--threads 2] [--reps 3]
                           [--niter 25] [--modes own_init,same_init]
                           [--label NAME] [--out FILE.json]
       faiss_kmeans.py --summarize DIR   (table of DIR's pqkv_r*.json and
                                          faiss_*_r*.json -> summary.md/.json)
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np


def loaded_blas():
    """Paths of the BLAS libraries this process mapped (what faiss calls)."""
    found = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                base = os.path.basename(path)
                if "blas" in base or "mkl" in base:
                    found.add(os.path.realpath(path))
    except OSError:
        pass
    return sorted(found)


def pq_mse(x, centroids):
    """Mean over rows of the sum over subspaces of the squared distance to the
    nearest centroid, in float64. centroids: [m, ksub, dsub]."""
    m, _, dsub = centroids.shape
    total = 0.0
    for s in range(m):
        xs = x[:, s * dsub:(s + 1) * dsub].astype(np.float64)
        c = centroids[s].astype(np.float64)
        d = (xs * xs).sum(1)[:, None] - 2.0 * xs @ c.T + (c * c).sum(1)[None, :]
        total += np.maximum(d.min(1), 0.0).sum()
    return total / x.shape[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--summarize", action="store_true", help="only summarize DIR's results")
    ap.add_argument("--modes", default="own_init,same_init")
    ap.add_argument("--configs", default="2:6,2:8,8:6,8:8,16:6,16:8", help="m:nbits,...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--niter", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--label", default="faiss")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.dir)

    import faiss  # imported late so --help works without it

    faiss.omp_set_num_threads(args.threads)
    x = np.ascontiguousarray(np.load(os.path.join(args.dir, "keys.npy")), dtype=np.float32)
    n, d = x.shape
    rows = []
    for item in args.configs.split(","):
        m, nbits = (int(v) for v in item.split(":"))
        ksub, dsub = 1 << nbits, d // m

        def params():
            cp = faiss.ClusteringParameters()
            cp.niter = args.niter
            cp.seed = args.seed
            # faiss subsamples to max_points_per_centroid * ksub rows by default
            # (256 * 64 = 16384 at ksub 64): raise it so faiss trains on all n rows.
            cp.max_points_per_centroid = (n + ksub - 1) // ksub + 1
            return cp

        def own_init():
            pq = faiss.ProductQuantizer(d, m, nbits)
            pq.cp = params()
            pq.verbose = False
            pq.train(x)
            return faiss.vector_to_array(pq.centroids).reshape(m, ksub, dsub)

        init_path = os.path.join(args.dir, f"pqkv_init_m{m}_nbits{nbits}.npy")
        init = np.load(init_path) if os.path.exists(init_path) else None

        def same_init():
            # What ProductQuantizer::train does per subspace, with given init.
            out = np.empty((m, ksub, dsub), dtype=np.float32)
            for s in range(m):
                xs = np.ascontiguousarray(x[:, s * dsub:(s + 1) * dsub])
                clus = faiss.Clustering(dsub, ksub, params())
                faiss.copy_array_to_vector(np.ascontiguousarray(init[s], dtype=np.float32).ravel(), clus.centroids)
                clus.train(xs, faiss.IndexFlatL2(dsub))
                out[s] = faiss.vector_to_array(clus.centroids).reshape(ksub, dsub)
            return out

        row = {"m": m, "nbits": nbits, "ksub": ksub, "dsub": dsub, "tokens": n, "dim": d, "niter": args.niter}
        modes = args.modes.split(",")
        for name, fn in (("own_init", own_init), ("same_init", same_init if init is not None else None)):
            if fn is None or name not in modes:
                continue
            best, cents = math.inf, None
            for _ in range(args.reps):
                t0 = time.perf_counter()
                cents = fn()
                best = min(best, time.perf_counter() - t0)
            row[name] = {"seconds": best, "mse": pq_mse(x, cents)}
        mine = os.path.join(args.dir, f"pqkv_m{m}_nbits{nbits}.npy")
        if os.path.exists(mine):
            row["pqkv_mse"] = pq_mse(x, np.load(mine))
        if init is not None:
            row["init_mse"] = pq_mse(x, init)
        rows.append(row)
        line = f"{args.label}: m={m:2d} nbits={nbits}"
        for name in ("own_init", "same_init"):
            if name in row:
                line += f"  {name} {row[name]['seconds'] * 1e3:8.1f} ms mse={row[name]['mse']:.5f}"
        if "pqkv_mse" in row:
            line += f"  pqkv mse={row['pqkv_mse']:.5f}"
        print(line, flush=True)

    result = {"label": args.label, "faiss_version": faiss.__version__, "numpy_version": np.__version__,
              "threads": args.threads, "reps": args.reps, "blas": loaded_blas(),
              "omp_max_threads": faiss.omp_get_max_threads(), "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def summarize(out_dir):
    """Joins pqkv_r*.json (Google Benchmark) and faiss_*_r*.json into summary.md/.json."""
    meta = {}
    with open(os.path.join(out_dir, "meta.txt")) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("=")
            meta[key] = value
    import glob

    pqkv, gb = {}, {}
    for path in sorted(glob.glob(os.path.join(out_dir, "pqkv_r*.json"))):
        with open(path) as f:
            gb = json.load(f)
        for b in gb["benchmarks"]:
            if b.get("run_type") != "iteration" or not b["name"].startswith("kmeans_vs_faiss/"):
                continue
            parts = dict(p.split(":") for p in b["name"].split("/")[1:] if ":" in p)
            if int(parts.get("threads", meta.get("threads", 0))) != int(meta.get("threads", 0)):
                continue
            key = (int(parts["m"]), int(parts["nbits"]))
            scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
            entry = pqkv.setdefault(key, {"ms": [], "mse_reported": b.get("mse")})
            entry["ms"].append(b["real_time"] * scale)
    # Best time per configuration and mode over the rounds of each anchor.
    anchors = {}
    for name in ("faiss_openblas", "faiss_system"):
        merged, by_key = None, {}
        for path in sorted(glob.glob(os.path.join(out_dir, name + "_r*.json"))):
            with open(path) as f:
                data = json.load(f)
            if merged is None:
                merged = {k: v for k, v in data.items() if k != "results"}
            for r in data["results"]:
                key = (r["m"], r["nbits"])
                if key not in by_key:
                    by_key[key] = r
                    for mode in ("own_init", "same_init"):
                        if mode in r:
                            r[mode]["seconds_all"] = [r[mode]["seconds"]]
                    continue
                best = by_key[key]
                for mode in ("own_init", "same_init"):
                    if mode in r and mode in best:
                        best[mode]["seconds_all"].append(r[mode]["seconds"])
                        best[mode]["seconds"] = min(best[mode]["seconds"], r[mode]["seconds"])
        if merged is not None:
            merged["results"] = [by_key[k] for k in sorted(by_key)]
            anchors[name] = merged
    rows = []
    for key in sorted(pqkv):
        m, nbits = key
        row = {"m": m, "nbits": nbits, "ksub": 1 << nbits, "dsub": 128 // m,
               "pqkv_ms": min(pqkv[key]["ms"]), "pqkv_ms_all": pqkv[key]["ms"],
               "pqkv_mse_reported": pqkv[key]["mse_reported"]}
        for name, data in anchors.items():
            for r in data["results"]:
                if (r["m"], r["nbits"]) != key:
                    continue
                row["pqkv_mse"] = r.get("pqkv_mse")
                row["init_mse"] = r.get("init_mse")
                for mode in ("own_init", "same_init"):
                    if mode in r:
                        row[f"{name}_{mode}_ms"] = r[mode]["seconds"] * 1e3
                        row[f"{name}_{mode}_mse"] = r[mode]["mse"]
                        row[f"speedup_vs_{name}_{mode}"] = r[mode]["seconds"] * 1e3 / row["pqkv_ms"]
        rows.append(row)

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = [f"# pqkv CPU k-means vs faiss ({meta.get('date', '?')})", "",
             f"- device: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores; {meta.get('threads')} threads for both",
             f"- commit: {meta.get('commit', '?')}" + (f" (+{meta['dirty']} uncommitted files)" if meta.get("dirty", "0") != "0" else ""),
             f"- load average before / after: {meta.get('load_before', '?')} / {meta.get('load_after', '?')}",
             f"- faiss {next(iter(anchors.values()))['faiss_version'] if anchors else '?'}; BLAS: "
             + "; ".join(f"{n}: {', '.join(os.path.basename(p) for p in d['blas']) or '?'}" for n, d in anchors.items()),
             "- one head, 32768 tokens, d = 128, 25 iterations (tol = 0), random init; faiss with",
             "  max_points_per_centroid raised so it trains on all 32768 rows; times: best over "
             f"{meta.get('rounds', '?')} rounds (per configuration pqkv {meta.get('pqkv_reps', '?')} runs, then faiss 1);",
             "  MSE: float64, mean over tokens of the sum over subspaces of the distance to the nearest centroid",
             "", "| m | nbits | dsub | ksub | pqkv ms | faiss+OpenBLAS ms (own init / same init) | speedup (own / same) "
             "| faiss system BLAS ms | speedup | MSE pqkv | MSE faiss same init | MSE faiss own init |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['m']} | {r['nbits']} | {r['dsub']} | {r['ksub']} | {r['pqkv_ms']:.1f} "
            f"| {fmt(r.get('faiss_openblas_own_init_ms'), '.1f')} / {fmt(r.get('faiss_openblas_same_init_ms'), '.1f')} "
            f"| {fmt(r.get('speedup_vs_faiss_openblas_own_init'), '.2f')}x / {fmt(r.get('speedup_vs_faiss_openblas_same_init'), '.2f')}x "
            f"| {fmt(r.get('faiss_system_own_init_ms'), '.1f')} | {fmt(r.get('speedup_vs_faiss_system_own_init'), '.2f')}x "
            f"| {fmt(r.get('pqkv_mse'), '.5f')} "
            f"| {fmt(r.get('faiss_openblas_same_init_mse', r.get('faiss_system_same_init_mse')), '.5f')} "
            f"| {fmt(r.get('faiss_openblas_own_init_mse', r.get('faiss_system_own_init_mse')), '.5f')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    # Keep file names, not where this machine keeps them.
    meta["openblas"] = os.path.basename(meta.get("openblas", "").rstrip("/"))
    for data in anchors.values():
        data["blas"] = [os.path.basename(p) for p in data.get("blas", [])]
    context = dict(gb.get("context", {}))
    if "executable" in context:
        context["executable"] = os.path.basename(context["executable"])
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "faiss": anchors, "pqkv_context": context}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
