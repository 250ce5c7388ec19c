// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Tensor-core nearest-centroid assignment with an exact answer, shared
/// by `pqkv::gpu::pq_encoder` (exact-form distance) and
/// `pqkv::gpu::kmeans_trainer` (gemm-form distance). Users never name this
/// header.
///
/// Method, per (head, subspace) problem and 16-row tile (one warp):
/// 1. Translate by mu = the mean of the problem's centroids (distances are
///    translation invariant), x' = x - mu, c' = c - mu in float.
/// 2. Approximate a_c = ||c'||^2 - 2 x'.c' with BF16 `mma.sync` (m16n8k16,
///    float accumulation; the accumulator starts at the float ||c'||^2 and B
///    holds -2 bf16(c'), exact). All ksub accumulators of a row stay in
///    registers.
/// 3. Keep the candidates c with a_c <= min_c a_c + T(row), T below.
/// 4. Recompute every candidate with the reference's own float chain and
///    order (the encoder's exact form or the trainer's gemm form), choose the
///    minimum, lowest index on ties. A row with more than `cap` candidates
///    (or a non-finite bound) scans all ksub centroids exactly instead
///    ("fallback"); fallbacks are counted when a counter is given.
///
/// The bound. Let f_c be the reference's float distance and D_c the exact
/// real ||x' - c'||^2 - ||x'||^2. If |a_c - D_c - (f_c - ||x'||^2 - r)| <= E for
/// every c (r: a per-row constant), then the reference's argmin c* (and every
/// centroid tied with it) has a_{c*} <= a_c + 2E for all c, so it passes
/// step 3 with T = 2E. With u = 2^-9 (bf16 unit roundoff), X' = ||x'||,
/// M' = max_c ||c'||, X = ||x||, M = max_c ||c|| (float norms, per row and per
/// problem), and (X' + M')^2 >= 4 sum|x'_i c'_i|:
///   bf16 rounding of x' and c':     2 (2u + u^2) sum|x'_i c'_i|  <= 1.01 * 2^-9 (X' + M')^2
///   float accumulation in the MMA,  (dsub + 4) 2^-22 (X' + M')^2
///   ||c'||^2 in float, x' and c' rounding of the translation: (both inside the line above)
///   the reference's own rounding:   exact form: (dsub + 3) 1.01 * 2^-24 (X' + M')^2
///                                   gemm form:  (dsub + 2) 1.01 * 2^-24 (X + M)^2
/// (the accumulation term assumes at most 4 float units of error per k-step
/// relative to the magnitudes summed, which covers truncating accumulators).
/// T is 2 x the sum of these, times 1.25 for the rounding of T and min + T
/// themselves, plus 2^-116 (X' + M') + 2^-100 for subnormal inputs and
/// products the tensor cores might flush to zero. Anything
/// non-finite (huge keys) takes the fallback, so the answer is exact for all
/// finite inputs; the bound only decides how often the fallback runs.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/views.hpp>

#include <cuda/std/limits>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pqkv::detail::assign_tc {

inline constexpr int warps = 8;
inline constexpr int threads = 32 * warps;
inline constexpr int rows = 16;    ///< rows per warp tile
inline constexpr int kmax = 256;   ///< accumulators held per row (ksub <= 256)
inline constexpr int cap = 8;      ///< candidates per row before the exact fallback

/// Distance chain the exact re-check reproduces.
enum class chain { exact, gemm };

/// Whether the tensor-core path is built for this shape.
[[nodiscard]] constexpr bool supported(index_t dsub, index_t ksub) noexcept
{
  return (dsub == 16 || dsub == 32 || dsub == 64 || dsub == 128) && ksub >= 16 && ksub <= kmax;
}
/// Whether `automatic` picks the tensor-core path. Not yet anywhere: on an
/// H100 (bench/results/2026-11-27-h100-assign-tc.md) it was slower than the
/// FP32 path at every measured shape but one (encode, dsub 64, ksub 256),
/// because the per-(row, centroid) candidate scan after the MMA, not the MMA,
/// bounds it. Force `assign_path::tensor_core` to use it.
[[nodiscard]] constexpr bool pays(index_t, index_t) noexcept { return false; }

/// Launch parameters. Row t of problem p = h * m + s reads element j at
/// x[h * s0 + s * ss + t * s1 + j * s2].
template <class Key>
struct args {
  Key const* x;
  index_t s0, ss, s1, s2;
  float const* centroids;       // [P][ksub][dsub]
  index_t n;                    // rows per problem
  int m, ksub;
  index_t tiles_per_block;      // 16-row tiles per block
  // encoder sink: codes[(h * capacity + position + t) * m + s]
  std::uint8_t* codes;
  index_t capacity, position;
  index_t const* position_dev;  // device position, or null
  // trainer sink: assign[p * n + t], dist[p * n + t] = max(0, best + xn[p * n + t])
  std::uint8_t* assign;
  float* dist;
  float const* xn;
  int const* active;            // [P] or null: an inactive problem is skipped
  unsigned long long* fallbacks;  // optional counter of rows that took the exact scan
};

/// Shared memory of the kernel.
[[nodiscard]] constexpr std::size_t smem_bytes(int dsub) noexcept
{
  return static_cast<std::size_t>(kmax) * (dsub + 8) * 2          // -2 bf16(c')
         + static_cast<std::size_t>(kmax) * 4 * 2                 // ||c'||^2, ||c||^2 (exact chain)
         + static_cast<std::size_t>(dsub) * 4                     // mu
         + static_cast<std::size_t>(warps) * rows * 4 * cap * 2  // candidate lists (int16)
         + 16;                                                    // maxima
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], std::uint32_t const (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1)
{
  asm volatile(
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
    "{%0,%1,%2,%3};\n"
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi)
{
  __nv_bfloat162 const v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<std::uint32_t const*>(&v);
}

/// The reference's float distance of row xr (stride s2) to centroid c.
template <chain Chain, int Dsub, class Key>
__device__ __forceinline__ float exact_distance(Key const* xr, index_t s2, float const* c, float cnorm)
{
  float acc = Chain == chain::gemm ? cnorm : 0.f;
#pragma unroll 8
  for (int j = 0; j < Dsub; ++j) {
    float const xv = to_float(xr[j * s2]);
    float const cv = __ldg(c + j);
    if constexpr (Chain == chain::gemm) {
      acc = fmaf(xv, -2.f * cv, acc);
    } else {
      float const d = __fsub_rn(xv, cv);
      acc = fmaf(d, d, acc);
    }
  }
  return acc;
}

/// Combines (value, index) across the 4 lanes of a quad, the lower index winning ties.
__device__ __forceinline__ void quad_argmin(float& v, int& i)
{
#pragma unroll
  for (int off = 1; off <= 2; off *= 2) {
    float const ov = __shfl_xor_sync(0xffffffffu, v, off);
    int const oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (ov < v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

/// grid (P, blocks per problem), `threads` threads; see the file comment.
template <class Key, int Dsub, chain Chain, bool Train>
__global__ void __launch_bounds__(threads, 1) assign_kernel(args<Key> a)
{
  constexpr int cstride = Dsub + 8;  // bf16 per centroid row: conflict-free 32-bit fragment loads
  constexpr int ksteps = Dsub / 16;
  int const p = blockIdx.x, h = p / a.m, s = p % a.m;
  if (a.active != nullptr && a.active[p] == 0) { return; }
  index_t position = 0;
  if constexpr (!Train) {
    position = a.position_dev != nullptr ? *a.position_dev : a.position;
    if (position < 0 || position > a.capacity - a.n) { return; }
  }
  index_t const tile0 = static_cast<index_t>(blockIdx.y) * a.tiles_per_block;
  index_t const ntiles = (a.n + rows - 1) / rows;
  if (tile0 >= ntiles) { return; }

  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto* const cb = reinterpret_cast<__nv_bfloat16*>(smem_raw);                           // [kmax][cstride]
  auto* const cna = reinterpret_cast<float*>(cb + static_cast<std::size_t>(kmax) * cstride);  // [kmax] ||c'||^2
  float* const cne = cna + kmax;                                                          // [kmax] ||c||^2 chain
  float* const mu = cne + kmax;                                                           // [Dsub]
  auto* const lists = reinterpret_cast<std::int16_t*>(mu + Dsub);  // [warps][rows][4][cap]
  auto* const smax = reinterpret_cast<std::uint32_t*>(lists + warps * rows * 4 * cap);  // M', M (float bits)

  int const tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, q = lane % 4;
  int const ksub = a.ksub, ntile_c = (ksub + 7) / 8;
  float const* const c = a.centroids + static_cast<std::size_t>(p) * ksub * Dsub;

  // ---- the problem's centroids: mu, c', norms ----
  // mu: coalesced partial sums over centroids k = part (mod parts), then the
  // parts in order (cna is scratch until the norms are written).
  {
    constexpr int parts = threads / Dsub;
    int const j = tid % Dsub, part = tid / Dsub;
    float sum = 0.f;
#pragma unroll 8
    for (int k = part; k < ksub; k += parts) { sum += __ldg(c + k * Dsub + j); }
    cna[part * Dsub + j] = sum;
    if (tid < 2) { smax[tid] = 0u; }
    __syncthreads();
    if (tid < Dsub) {
      float total = 0.f;
      for (int r = 0; r < parts; ++r) { total += cna[r * Dsub + tid]; }
      mu[tid] = total / static_cast<float>(ksub);
    }
    __syncthreads();
  }
  // One thread per centroid walks its row in channel order (the reference's
  // ||c||^2 chain), 16-byte loads where the rows are aligned.
  {
    int const k = tid;  // threads == kmax
    float na = 0.f, ne = 0.f;
    if (k < ksub) {
      float const* const row = c + k * Dsub;
      bool const vec = (reinterpret_cast<std::uintptr_t>(c) % 16) == 0;
#pragma unroll
      for (int j4 = 0; j4 < Dsub / 4; ++j4) {
        float v[4];
        if (vec) {
          float4 const f = __ldg(reinterpret_cast<float4 const*>(row) + j4);
          v[0] = f.x;
          v[1] = f.y;
          v[2] = f.z;
          v[3] = f.w;
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) { v[e] = __ldg(row + 4 * j4 + e); }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int const j = 4 * j4 + e;
          float const d = __fsub_rn(v[e], mu[j]);
          na = fmaf(d, d, na);
          ne = fmaf(v[e], v[e], ne);
          cb[k * cstride + j] = __float2bfloat16_rn(-2.f * d);
        }
      }
      atomicMax(smax, __float_as_uint(sqrtf(na)));
      atomicMax(smax + 1, __float_as_uint(sqrtf(ne)));
    } else {
#pragma unroll
      for (int j = 0; j < Dsub; ++j) { cb[k * cstride + j] = __float2bfloat16_rn(0.f); }
    }
    cna[k] = k < ksub ? na : ::cuda::std::numeric_limits<float>::infinity();
    cne[k] = ne;
  }
  __syncthreads();
  float const mc = __uint_as_float(smax[0]), mu_c = __uint_as_float(smax[1]);
  constexpr float eps_tc = 1.01f * 0x1p-9f + static_cast<float>(Dsub + 4) * 0x1p-22f;
  constexpr float eps_ref = static_cast<float>(Dsub + 3) * 1.01f * 0x1p-24f;
  std::int16_t* const mylist = lists + warp * rows * 4 * cap;

  index_t const tile_end = tile0 + a.tiles_per_block < ntiles ? tile0 + a.tiles_per_block : ntiles;
  for (index_t tile = tile0 + warp; tile < tile_end; tile += warps) {
    index_t const t0 = tile * rows;
    index_t const ta = t0 + g, tb = t0 + g + 8;
    bool const va = ta < a.n, vb = tb < a.n;
    Key const* const xa = a.x + h * a.s0 + s * a.ss + (va ? ta : 0) * a.s1;
    Key const* const xb = a.x + h * a.s0 + s * a.ss + (vb ? tb : 0) * a.s1;

    // ---- A fragments of x' and the row norms ----
    std::uint32_t af[ksteps][4];
    float nta = 0.f, ntb = 0.f, nua = 0.f, nub = 0.f;  // ||x'||^2, ||x||^2 partial sums
#pragma unroll
    for (int ks = 0; ks < ksteps; ++ks) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        int const j = ks * 16 + half * 8 + 2 * q;
        float const x0 = va ? to_float(xa[j * a.s2]) : 0.f, x1 = va ? to_float(xa[(j + 1) * a.s2]) : 0.f;
        float const y0 = vb ? to_float(xb[j * a.s2]) : 0.f, y1 = vb ? to_float(xb[(j + 1) * a.s2]) : 0.f;
        float const dx0 = __fsub_rn(x0, mu[j]), dx1 = __fsub_rn(x1, mu[j + 1]);
        float const dy0 = __fsub_rn(y0, mu[j]), dy1 = __fsub_rn(y1, mu[j + 1]);
        nta = fmaf(dx0, dx0, fmaf(dx1, dx1, nta));
        ntb = fmaf(dy0, dy0, fmaf(dy1, dy1, ntb));
        nua = fmaf(x0, x0, fmaf(x1, x1, nua));
        nub = fmaf(y0, y0, fmaf(y1, y1, nub));
        af[ks][2 * half] = pack_bf16(dx0, dx1);
        af[ks][2 * half + 1] = pack_bf16(dy0, dy1);
      }
    }
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      nta += __shfl_xor_sync(0xffffffffu, nta, off);
      ntb += __shfl_xor_sync(0xffffffffu, ntb, off);
      nua += __shfl_xor_sync(0xffffffffu, nua, off);
      nub += __shfl_xor_sync(0xffffffffu, nub, off);
    }

    // ---- approximate distances: all ksub accumulators of both rows in registers ----
    float acc[kmax / 8][4];
#pragma unroll
    for (int nt = 0; nt < kmax / 8; ++nt) {
      if (nt < ntile_c) {
        float const c0 = cna[nt * 8 + 2 * q], c1 = cna[nt * 8 + 2 * q + 1];
        acc[nt][0] = c0;
        acc[nt][1] = c1;
        acc[nt][2] = c0;
        acc[nt][3] = c1;
        __nv_bfloat16 const* const bp = cb + (nt * 8 + g) * cstride + 2 * q;
#pragma unroll
        for (int ks = 0; ks < ksteps; ++ks) {
          std::uint32_t const b0 = *reinterpret_cast<std::uint32_t const*>(bp + ks * 16);
          std::uint32_t const b1 = *reinterpret_cast<std::uint32_t const*>(bp + ks * 16 + 8);
          mma_bf16(acc[nt], af[ks], b0, b1);
        }
      }
    }
    float mina = ::cuda::std::numeric_limits<float>::infinity(), minb = mina;
#pragma unroll
    for (int nt = 0; nt < kmax / 8; ++nt) {
      if (nt < ntile_c) {
        mina = fminf(mina, fminf(acc[nt][0], acc[nt][1]));
        minb = fminf(minb, fminf(acc[nt][2], acc[nt][3]));
      }
    }
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      mina = fminf(mina, __shfl_xor_sync(0xffffffffu, mina, off));
      minb = fminf(minb, __shfl_xor_sync(0xffffffffu, minb, off));
    }
    // T of the file comment; `huge` when (X' + M')^2 or (X + M)^2 is within a
    // factor 4 of overflow, where intermediate sums could overflow too.
    auto bound = [&](float nt2, float nu2, bool& huge) {
      float const r = sqrtf(nt2) + mc, ru = sqrtf(nu2) + mu_c;
      float const ref = Chain == chain::gemm ? eps_ref * ru * ru : eps_ref * r * r;
      huge = !(isfinite(4.f * r * r) && isfinite(4.f * ru * ru));
      return 2.5f * (eps_tc * r * r + ref) + 0x1p-116f * r + 0x1p-100f;
    };
    bool hua = false, hub = false;
    float const ba = bound(nta, nua, hua), bb = bound(ntb, nub, hub);
    // A non-finite bound or minimum (huge inputs) sends the row to the exact scan.
    bool const fa_nf = hua || !(isfinite(ba) && isfinite(mina));
    bool const fb_nf = hub || !(isfinite(bb) && isfinite(minb));
    float const tha = mina + ba, thb = minb + bb;

    // ---- candidates: each lane lists its own, ascending ----
    std::int16_t* const la = mylist + (g * 4 + q) * cap;
    std::int16_t* const lb = mylist + ((g + 8) * 4 + q) * cap;
    int cnta = 0, cntb = 0;
    // (a pair's minimum first: candidates are rare, so most pairs cost one test)
#pragma unroll
    for (int nt = 0; nt < kmax / 8; ++nt) {
      if (nt < ntile_c) {
        if (fminf(acc[nt][0], acc[nt][1]) <= tha) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (acc[nt][e] <= tha) {
              if (cnta < cap) { la[cnta] = static_cast<std::int16_t>(nt * 8 + 2 * q + e); }
              ++cnta;
            }
          }
        }
        if (fminf(acc[nt][2], acc[nt][3]) <= thb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (acc[nt][2 + e] <= thb) {
              if (cntb < cap) { lb[cntb] = static_cast<std::int16_t>(nt * 8 + 2 * q + e); }
              ++cntb;
            }
          }
        }
      }
    }
    int tota = cnta, totb = cntb;
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      tota += __shfl_xor_sync(0xffffffffu, tota, off);
      totb += __shfl_xor_sync(0xffffffffu, totb, off);
    }
    __syncwarp();

    // ---- the exact re-check (or scan) with the reference's chain ----
    auto decide = [&](bool valid, bool fallback, int cnt, std::int16_t const* list, Key const* xr, float& best,
                      int& bidx) {
      best = ::cuda::std::numeric_limits<float>::infinity();
      bidx = 0x7fffffff;
      if (!valid) { return; }
      if (fallback) {
        for (int k = q; k < ksub; k += 4) {
          float const d = exact_distance<Chain, Dsub>(xr, a.s2, c + k * Dsub, cne[k]);
          if (d < best || bidx == 0x7fffffff) {
            best = d;
            bidx = k;
          }
        }
      } else {
        for (int i = 0; i < cnt; ++i) {
          int const k = list[i];
          float const d = exact_distance<Chain, Dsub>(xr, a.s2, c + k * Dsub, cne[k]);
          if (d < best || bidx == 0x7fffffff) {
            best = d;
            bidx = k;
          }
        }
      }
    };
    bool const fba = fa_nf || tota > cap, fbb = fb_nf || totb > cap;
    float besta = 0.f, bestb = 0.f;
    int ia = 0, ib = 0;
    decide(va, fba, cnta, la, xa, besta, ia);
    decide(vb, fbb, cntb, lb, xb, bestb, ib);
    quad_argmin(besta, ia);
    quad_argmin(bestb, ib);
    __syncwarp();  // the lists are read before the next tile rewrites them

    if (q < 2) {
      bool const v = q == 0 ? va : vb;
      index_t const t = q == 0 ? ta : tb;
      int const code = q == 0 ? ia : ib;
      if (v) {
        if constexpr (Train) {
          index_t const o = static_cast<index_t>(p) * a.n + t;
          a.assign[o] = static_cast<std::uint8_t>(code);
          a.dist[o] = fmaxf(0.f, __fadd_rn(q == 0 ? besta : bestb, a.xn[o]));
        } else {
          a.codes[(static_cast<index_t>(h) * a.capacity + position + t) * a.m + s] = static_cast<std::uint8_t>(code);
        }
        if (a.fallbacks != nullptr && (q == 0 ? fba : fbb)) { atomicAdd(a.fallbacks, 1ull); }
      }
    }
  }
}

/// Calls f(integral_constant<Dsub>) for a supported runtime dsub.
template <class F>
void dispatch(int dsub, F&& f)
{
  switch (dsub) {
    case 16: f.template operator()<16>(); break;
    case 32: f.template operator()<32>(); break;
    case 64: f.template operator()<64>(); break;
    default: f.template operator()<128>(); break;
  }
}

/// Raises the kernel's dynamic shared-memory limit (once, at construction).
template <class Key, chain Chain, bool Train>
void prepare(int dsub)
{
  dispatch(dsub, [&]<int D>() {
    PQKV_CUDA_TRY(cudaFuncSetAttribute(assign_kernel<Key, D, Chain, Train>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem_bytes(D))));
  });
}

/// 16-row tiles per block for `problems` problems of n rows on `sms` SMs:
/// about four blocks per SM in all, whole warps of tiles each.
[[nodiscard]] inline index_t tiles_per_block(index_t problems, index_t n, int sms)
{
  index_t const ntiles = (n + rows - 1) / rows;
  index_t bpp = (4 * static_cast<index_t>(sms) + problems - 1) / problems;
  index_t const max_bpp = (ntiles + warps - 1) / warps;
  if (bpp > max_bpp) { bpp = max_bpp; }
  if (bpp < 1) { bpp = 1; }
  index_t tpb = (ntiles + bpp - 1) / bpp;
  return (tpb + warps - 1) / warps * warps;
}

template <class Key, chain Chain, bool Train>
void launch(args<Key> const& a, int dsub, int problems, cudaStream_t stream)
{
  index_t const ntiles = (a.n + rows - 1) / rows;
  auto const grid_y = static_cast<unsigned>((ntiles + a.tiles_per_block - 1) / a.tiles_per_block);
  dispatch(dsub, [&]<int D>() {
    assign_kernel<Key, D, Chain, Train>
      <<<dim3(static_cast<unsigned>(problems), grid_y), threads, smem_bytes(D), stream>>>(a);
    PQKV_CUDA_CHECK_LAST();
  });
}

}  // namespace pqkv::detail::assign_tc
