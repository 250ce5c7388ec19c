// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of `pqkv::gpu::adc_topk` (score/adc_topk.cuh). Users never
/// name this header.
///
/// One decode step is a chain of stream-ordered launches, each over a grid of
/// (token chunk, row), a row being one (sequence, KV head):
///   lut      LUT [row, m, ksub, r] into the workspace; zeroes the histograms
///            and counters
///   score    (softmax policies: two statistic phases first) scores every
///            candidate of the chunk, writes its 32-bit rank key to the
///            workspace and adds its top 11 bits to the row's histogram
///   refine   x2: histograms the next 11 and then the last 10 key bits among
///            the keys that match the threshold prefix found so far
///   count    per chunk: keys above the threshold key T, keys equal to T
///   emit     writes the selected token indices, ascending, at offsets given
///            by the earlier chunks' counts; pads with -1
/// After each histogram pass, the last block of the row to finish (an atomic
/// counter) resolves that pass's digit of the threshold and stores it; the
/// next kernel in the stream reads it. The digit does not depend on which
/// block is last, so results do not depend on block order. Sequence lengths
/// are read on the device; blocks past a row's candidates exit at once.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/lut.hpp>
#include <pqkv/score/topk.hpp>

#include <cub/block/block_scan.cuh>
#include <cuda/std/limits>
#include <cuda/std/utility>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pqkv::detail::adc_gpu {

inline constexpr int block_threads = 256;
inline constexpr int max_group = 8;        ///< largest q-heads-per-KV-head group the kernels take
inline constexpr int hist_bins = 2048;     ///< 11 key bits per pass (the last pass uses 10)
inline constexpr int radix_passes = 3;     ///< 11 + 11 + 10 bits of the 32-bit score key
inline constexpr int warps = block_threads / 32;
inline constexpr int emit_items = 16;
inline constexpr int lut_centroids = 32;   ///< centroids per block of the LUT kernel      ///< consecutive tokens per thread in the emit kernel

/// Kernel parameters: plain pointers and sizes, validated on the host.
struct args {
  float const* q;                    // [batch, q_heads, dim]
  std::uint8_t const* codes;         // [batch, kv_heads, capacity, m]
  float const* centroids;            // [kv_heads, m, ksub, dsub]
  std::int32_t const* seq_lens;      // [batch]
  std::int32_t* out;                 // [batch, kv_heads, out_k]
  std::int32_t* valid;               // [batch, kv_heads]
  float* lut;                        // workspace [rows, m, ksub, r]
  std::uint32_t* keys;               // workspace [rows, capacity]
  std::uint32_t* hist;               // workspace [rows, radix_passes, hist_bins]
  std::uint32_t* chunk_counts;       // workspace [rows, max_chunks, 2]: (above T, equal to T)
  std::uint32_t* done;               // workspace [rows, radix_passes]: blocks done with each histogram
  std::uint32_t* state;              // workspace [rows, 2]: threshold prefix, keys still to take in it
  float* logits;                     // workspace, softmax policies: [rows, capacity, r]
  float* part_max;                   // workspace [batch, q_heads, max_chunks]
  double* part_sum;                  // workspace [batch, q_heads, max_chunks]
  index_t capacity;
  index_t sink;
  index_t window;
  int q_heads, kv_heads, r, dim, m, dsub, ksub;
  int k, out_k;
  int chunk_tokens, max_chunks;
  float scale;
};

/// The candidates of one row, from its sequence length in device memory
/// (clamped to [0, capacity]).
struct row_info {
  index_t first;
  index_t count;
  int k_eff;
  int chunks;  ///< chunks of chunk_tokens candidates, the last one partial
};

__device__ __forceinline__ row_info row_of(args const& a, int b)
{
  index_t n = a.seq_lens[b];
  n = n < 0 ? 0 : (n > a.capacity ? a.capacity : n);
  token_range const cand = candidate_range(n, a.sink, a.window);
  row_info ri;
  ri.first = cand.first;
  ri.count = cand.size();
  ri.k_eff = static_cast<int>(ri.count < a.k ? ri.count : a.k);
  ri.chunks = static_cast<int>((ri.count + a.chunk_tokens - 1) / a.chunk_tokens);
  return ri;
}

/// Adds 1 to hist[bin] for every lane with `valid`; lanes of the warp with the
/// same bin add once together (scores crowd into a few bins of the top key
/// bits, where per-lane shared atomics would serialize). All 32 lanes call it.
__device__ __forceinline__ void warp_hist_add(std::uint32_t* hist, std::uint32_t bin, bool valid)
{
  unsigned const peers = __match_any_sync(0xffffffffu, valid ? bin : 0xffffffffu);
  if (valid && static_cast<int>(threadIdx.x % 32) == __ffs(static_cast<int>(peers)) - 1) {
    atomicAdd(hist + bin, static_cast<std::uint32_t>(__popc(peers)));
  }
}

// ---- LUT ---------------------------------------------------------------------------------

/// grid (m, rows, ksub / lut_centroids): the LUT of subspace j of one row, interleaved
/// [c][h_local] as `build_group_lut`; the j == 0 block zeroes the row's
/// histograms for the score and refine kernels that follow in the stream.
/// Centroids are staged through shared memory in tiles (rows padded to an odd
/// stride, so the threads of a warp reading different centroids hit
/// different banks).
template <int Unused = 0>
__global__ void __launch_bounds__(block_threads) lut_kernel(args a)
{
  constexpr int tile_floats = 8192;
  __shared__ float cs[tile_floats];
  __shared__ float qs[max_group * max_lut_dsub];
  int const j = static_cast<int>(blockIdx.x);
  int const row = static_cast<int>(blockIdx.y);
  int const b = row / a.kv_heads, g = row % a.kv_heads;
  if (j == 0 && blockIdx.z == 0) {
    std::uint32_t* h = a.hist + static_cast<std::size_t>(row) * radix_passes * hist_bins;
    for (int i = static_cast<int>(threadIdx.x); i < radix_passes * hist_bins; i += block_threads) { h[i] = 0u; }
    if (threadIdx.x < radix_passes) { a.done[row * radix_passes + static_cast<int>(threadIdx.x)] = 0u; }
  }
  int const r = a.r, ksub = a.ksub, dsub = a.dsub, stride = dsub | 1;
  for (int i = static_cast<int>(threadIdx.x); i < r * dsub; i += block_threads) {
    int const hl = i / dsub, d = i % dsub;
    qs[i] = a.q[(static_cast<std::size_t>(b) * a.q_heads + g * r + hl) * a.dim + j * dsub + d];
  }
  float const* cg = a.centroids + (static_cast<std::size_t>(g) * a.m + j) * ksub * dsub;
  float* out = a.lut + (static_cast<std::size_t>(row) * a.m + j) * ksub * r;
  // blockIdx.z: which lut_centroids centroids of the codebook this block takes.
  int const c_begin = static_cast<int>(blockIdx.z) * lut_centroids;
  int const c_end = c_begin + lut_centroids < ksub ? c_begin + lut_centroids : ksub;
  int const ctile = tile_floats / stride;
  for (int c0 = c_begin; c0 < c_end; c0 += ctile) {
    int const nc = c_end - c0 < ctile ? c_end - c0 : ctile;
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < nc * dsub; i += block_threads) {
      cs[(i / dsub) * stride + i % dsub] = cg[static_cast<std::size_t>(c0) * dsub + i];
    }
    __syncthreads();
    for (int e = static_cast<int>(threadIdx.x); e < nc * r; e += block_threads) {
      int const c = e / r, hl = e % r;
      // The contract's fma chain over the sub-vector: the CPU's bits.
      out[c0 * r + e] = lut_entry(qs + hl * dsub, cs + c * stride, dsub);
    }
  }
}

// ---- radix-select helpers ---------------------------------------------------------------------------

/// Bits of pass p: [shift, shift + width) of the key.
__device__ __forceinline__ int pass_shift(int p) { return p == 0 ? 21 : (p == 1 ? 10 : 0); }
__device__ __forceinline__ int pass_bins(int p) { return p == 2 ? 1024 : 2048; }

struct threshold {
  std::uint32_t key;        ///< prefix of the k-th best key (all of it after 3 passes)
  std::uint32_t remaining;  ///< how many of the keys matching `key` are still to take
};

using block_scan = cub::BlockScan<std::uint32_t, block_threads>;

/// Resolves the digit of pass p: walks the row's histogram of that pass from
/// the top bin down to the bin holding the `th.remaining`-th key, appends the
/// bin to the prefix and keeps how many keys of that bin are still to take.
/// Block-wide; every thread gets the result. The histogram is read past L1
/// (other blocks' atomics made it).
__device__ __forceinline__ threshold resolve_digit(std::uint32_t const* hist_row, int p, threshold th,
                                                   block_scan::TempStorage& temp, std::uint32_t* s_pick)
{
  int const nbins = pass_bins(p), per = nbins / block_threads;
  std::uint32_t const* h = hist_row + p * hist_bins;
  int const top = nbins - 1 - static_cast<int>(threadIdx.x) * per;  // this thread's bins: top, top-1, ...
  std::uint32_t local[hist_bins / block_threads];
  std::uint32_t sum = 0;
#pragma unroll
  for (int i = 0; i < hist_bins / block_threads; ++i) {
    local[i] = i < per ? __ldcg(h + top - i) : 0u;
    sum += local[i];
  }
  std::uint32_t above = 0;
  block_scan(temp).ExclusiveSum(sum, above);
#pragma unroll
  for (int i = 0; i < hist_bins / block_threads; ++i) {
    if (i < per && above < th.remaining && th.remaining <= above + local[i]) {
      s_pick[0] = static_cast<std::uint32_t>(top - i);
      s_pick[1] = th.remaining - above;
    }
    above += local[i];
  }
  __syncthreads();
  th.key |= s_pick[0] << pass_shift(p);
  th.remaining = s_pick[1];
  __syncthreads();
  return th;
}

/// Called by every block of a histogram kernel (pass p) after its adds: the
/// last block of the row to finish resolves the pass's digit and stores the
/// threshold state that the next kernels read. The result does not depend on
/// which block is last.
__device__ __forceinline__ void finish_pass(args const& a, int row, int p, int k_eff, int chunks,
                                            block_scan::TempStorage& temp, std::uint32_t* s_pick)
{
  __shared__ bool s_last;
  __threadfence();  // this block's histogram adds before its "done"
  __syncthreads();
  if (threadIdx.x == 0) { s_last = atomicAdd(a.done + row * radix_passes + p, 1u) == static_cast<unsigned>(chunks - 1); }
  __syncthreads();
  if (!s_last) { return; }
  __threadfence();
  std::uint32_t* st = a.state + 2 * static_cast<std::size_t>(row);
  threshold th{0u, static_cast<std::uint32_t>(k_eff)};
  if (p > 0) { th = threshold{__ldcg(st), __ldcg(st + 1)}; }
  th = resolve_digit(a.hist + static_cast<std::size_t>(row) * radix_passes * hist_bins, p, th, temp, s_pick);
  if (threadIdx.x == 0) {
    st[0] = th.key;
    st[1] = th.remaining;
  }
}

/// The threshold state the last resolved pass stored.
__device__ __forceinline__ threshold load_threshold(args const& a, int row)
{
  std::uint32_t const* st = a.state + 2 * static_cast<std::size_t>(row);
  return threshold{__ldcg(st), __ldcg(st + 1)};
}

// ---- scoring -----------------------------------------------------------------------------

/// The m code bytes of one token, read with the widest aligned load M allows.
template <int M>
struct code_bytes {
  std::uint8_t v[M];
  __device__ __forceinline__ void load(std::uint8_t const* p)
  {
    if constexpr (M == 1) {
      v[0] = *p;
    } else if constexpr (M == 2) {
      auto const x = *reinterpret_cast<std::uint16_t const*>(p);
      v[0] = static_cast<std::uint8_t>(x);
      v[1] = static_cast<std::uint8_t>(x >> 8);
    } else if constexpr (M == 4) {
      auto const x = *reinterpret_cast<std::uint32_t const*>(p);
#pragma unroll
      for (int i = 0; i < 4; ++i) { v[i] = static_cast<std::uint8_t>(x >> (8 * i)); }
    } else {
      static_assert(M % 8 == 0);
      if constexpr (M == 8) {
        uint2 const x = *reinterpret_cast<uint2 const*>(p);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          v[i] = static_cast<std::uint8_t>(x.x >> (8 * i));
          v[4 + i] = static_cast<std::uint8_t>(x.y >> (8 * i));
        }
      } else {
#pragma unroll
        for (int w = 0; w < M / 16; ++w) {
          uint4 const x = *reinterpret_cast<uint4 const*>(p + 16 * w);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            v[16 * w + i] = static_cast<std::uint8_t>(x.x >> (8 * i));
            v[16 * w + 4 + i] = static_cast<std::uint8_t>(x.y >> (8 * i));
            v[16 * w + 8 + i] = static_cast<std::uint8_t>(x.z >> (8 * i));
            v[16 * w + 12 + i] = static_cast<std::uint8_t>(x.w >> (8 * i));
          }
        }
      }
    }
  }
};

/// Logits of one token for the r q heads of the group: step 3 of the
/// contract, `s = s + lut[j][code_j]` in subspace order, then `scale * s`,
/// each operation rounded on its own.
/// R == 4: the group's 4 entries of a code are one 16-byte shared load.
/// R == 0: any r <= max_group, one 4-byte load per head.
/// M > 0: m == M, codes read as one vector; M == 0: any m, byte by byte.
template <int M, int R>
__device__ __forceinline__ void token_logits(float const* __restrict__ lut, std::uint8_t const* __restrict__ code,
                                             int m, int ksub, int r, float scale, float (&x)[max_group])
{
  unsigned const mask = static_cast<unsigned>(ksub - 1);  // keeps a code >= ksub inside the LUT
  float acc[max_group];
#pragma unroll
  for (int h = 0; h < max_group; ++h) { acc[h] = 0.f; }
  auto add = [&](int j, unsigned c) {
    c &= mask;
    if constexpr (R == 4) {
      float4 const e = *reinterpret_cast<float4 const*>(lut + (j * ksub + static_cast<int>(c)) * 4);
      acc[0] = __fadd_rn(acc[0], e.x);
      acc[1] = __fadd_rn(acc[1], e.y);
      acc[2] = __fadd_rn(acc[2], e.z);
      acc[3] = __fadd_rn(acc[3], e.w);
    } else {
      float const* e = lut + (j * ksub + static_cast<int>(c)) * r;
#pragma unroll
      for (int h = 0; h < max_group; ++h) {
        if (h < r) { acc[h] = __fadd_rn(acc[h], e[h]); }
      }
    }
  };
  if constexpr (M > 0) {
    code_bytes<M> cb;
    cb.load(code);
#pragma unroll
    for (int j = 0; j < M; ++j) { add(j, cb.v[j]); }
  } else {
    for (int j = 0; j < m; ++j) { add(j, code[j]); }
  }
#pragma unroll
  for (int h = 0; h < max_group; ++h) { x[h] = __fmul_rn(scale, acc[h]); }
}

/// Shared-memory bytes of the score kernel: the row's LUT, then the histogram.
[[nodiscard]] __host__ __device__ inline std::size_t score_smem_bytes(int m, int ksub, int r)
{
  std::size_t const lut = (static_cast<std::size_t>(m) * ksub * r * sizeof(float) + 15) / 16 * 16;
  return lut + hist_bins * sizeof(std::uint32_t);
}

/// Phases of the score kernel (softmax policies run all three, the others 2).
enum score_phase : int { phase_max = 0, phase_sum = 1, phase_score = 2 };

/// The max (phase >= 1) and 1 / Z (phase 2) of each q head of the group, from
/// the per-chunk partials of the earlier phases: warp h reduces head h, its
/// lanes striding over the chunks, then a fixed shuffle tree (deterministic;
/// the max is exact, Z a double sum).
__device__ __forceinline__ void softmax_stats(args const& a, int b, int g, int rr, int chunks, int phase,
                                              float* s_max, float* s_inv_z)
{
  int const h = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (h >= rr) { return; }
  std::size_t const base = (static_cast<std::size_t>(b) * a.q_heads + g * a.r + h) * a.max_chunks;
  float mx = -::cuda::std::numeric_limits<float>::infinity();
  double z = 0.0;
  for (int c = lane; c < chunks; c += 32) {
    float const x = a.part_max[base + c];
    mx = x > mx ? x : mx;
    if (phase == phase_score) { z += a.part_sum[base + c]; }
  }
  for (int o = 16; o > 0; o /= 2) {
    float const w = __shfl_xor_sync(0xffffffffu, mx, o);
    mx = w > mx ? w : mx;
    z += __shfl_xor_sync(0xffffffffu, z, o);
  }
  if (lane == 0) {
    s_max[h] = mx;
    if (phase == phase_score) { s_inv_z[h] = static_cast<float>(1.0 / z); }
  }
}

template <int M, int R, class Aggregation>
__device__ __forceinline__ void score_tokens(args const& a, Aggregation const& agg, int phase, float const* lut,
                                             std::uint8_t const* codes_row, float* logits_row,
                                             std::uint32_t* keys_row, std::uint32_t* hist_s, index_t t0,
                                             index_t t1, int rr, float const* s_max, float const* s_inv_z,
                                             float (&vmax)[max_group], double (&vsum)[max_group])
{
  int const m = M > 0 ? M : a.m;
  float mx[max_group], inv_z[max_group];
  if constexpr (Aggregation::needs_softmax) {
#pragma unroll
    for (int h = 0; h < max_group; ++h) {
      mx[h] = h < rr && phase >= phase_sum ? s_max[h] : 0.f;
      inv_z[h] = h < rr && phase == phase_score ? s_inv_z[h] : 0.f;
    }
  }
  // Warps stay converged through the loop (uniform bounds) for the
  // warp-aggregated histogram.
  for (index_t base = t0; base < t1; base += block_threads) {
    index_t const t = base + threadIdx.x;
    bool const valid = t < t1;
    std::uint32_t key = 0;
    if (valid) {
      float x[max_group];
      if (!Aggregation::needs_softmax || phase == phase_max) {
        token_logits<M, R>(lut, codes_row + t * m, m, a.ksub, rr, a.scale, x);
      }
      if constexpr (Aggregation::needs_softmax) {
        // Phase 0 keeps the logits; phases 1 and 2 read them back instead of
        // scoring the codes again.
        float* lg = logits_row + t * rr;
        if (phase == phase_max) {
          if constexpr (R == 4) {
            *reinterpret_cast<float4*>(lg) = make_float4(x[0], x[1], x[2], x[3]);
          } else {
#pragma unroll
            for (int h = 0; h < max_group; ++h) {
              if (h < rr) { lg[h] = x[h]; }
            }
          }
#pragma unroll
          for (int h = 0; h < max_group; ++h) { vmax[h] = x[h] > vmax[h] ? x[h] : vmax[h]; }
        } else {
          if constexpr (R == 4) {
            float4 const v = *reinterpret_cast<float4 const*>(lg);
            x[0] = v.x;
            x[1] = v.y;
            x[2] = v.z;
            x[3] = v.w;
          } else {
#pragma unroll
            for (int h = 0; h < max_group; ++h) { x[h] = h < rr ? lg[h] : 0.f; }
          }
          if (phase == phase_sum) {
#pragma unroll
            for (int h = 0; h < max_group; ++h) {
              if (h < rr) { vsum[h] += static_cast<double>(expf(__fsub_rn(x[h], mx[h]))); }
            }
          } else {
#pragma unroll
            for (int h = 0; h < max_group; ++h) { x[h] = __fmul_rn(expf(__fsub_rn(x[h], mx[h])), inv_z[h]); }
          }
        }
      }
      if (!Aggregation::needs_softmax || phase == phase_score) {
        float acc = agg.init();
#pragma unroll
        for (int h = 0; h < max_group; ++h) {
          if (h < rr) { acc = agg.combine(acc, x[h]); }
        }
        key = score_rank_key(agg.finish(acc));
        keys_row[t] = key;
      }
    }
    if (!Aggregation::needs_softmax || phase == phase_score) { warp_hist_add(hist_s, key >> 21, valid); }
  }
}

/// grid (chunks, rows). Phase 2 writes the rank keys of the chunk's
/// candidates and adds their top 11 bits to the row's histogram; phases 0
/// and 1 (softmax policies) write the chunk's per-q-head max and sum of
/// expf(logit - max) instead.
template <int R, class Aggregation>
__global__ void __launch_bounds__(block_threads) score_kernel(args a, Aggregation agg, int phase)
{
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_max[max_group], s_inv_z[max_group];
  __shared__ double s_red[warps][max_group];
  int const chunk = static_cast<int>(blockIdx.x), row = static_cast<int>(blockIdx.y);
  int const b = row / a.kv_heads, g = row % a.kv_heads;
  row_info const ri = row_of(a, b);
  if (chunk >= ri.chunks || (phase == phase_score && ri.k_eff == 0)) { return; }
  int const rr = R > 0 ? R : a.r;
  int const lut_n = a.m * a.ksub * rr;
  auto* lut = reinterpret_cast<float*>(smem);
  auto* hist_s = reinterpret_cast<std::uint32_t*>(smem + score_smem_bytes(a.m, a.ksub, rr) -
                                                  hist_bins * sizeof(std::uint32_t));
  float const* lut_g = a.lut + static_cast<std::size_t>(row) * lut_n;
  bool const needs_lut = !Aggregation::needs_softmax || phase == phase_max;
  if (!needs_lut) {
    // Softmax phases 1 and 2 read the logits phase 0 kept.
  } else if (lut_n % 4 == 0) {
    for (int i = static_cast<int>(threadIdx.x); i < lut_n / 4; i += block_threads) {
      reinterpret_cast<float4*>(lut)[i] = reinterpret_cast<float4 const*>(lut_g)[i];
    }
  } else {
    for (int i = static_cast<int>(threadIdx.x); i < lut_n; i += block_threads) { lut[i] = lut_g[i]; }
  }
  if (phase == phase_score) {
    for (int i = static_cast<int>(threadIdx.x); i < hist_bins; i += block_threads) { hist_s[i] = 0u; }
  }
  if constexpr (Aggregation::needs_softmax) {
    if (phase >= phase_sum) { softmax_stats(a, b, g, rr, ri.chunks, phase, s_max, s_inv_z); }
  }
  __syncthreads();

  index_t const t0 = ri.first + static_cast<index_t>(chunk) * a.chunk_tokens;
  index_t const t1 = t0 + a.chunk_tokens < ri.first + ri.count ? t0 + a.chunk_tokens : ri.first + ri.count;
  std::uint8_t const* codes_row = a.codes + static_cast<std::size_t>(row) * a.capacity * a.m;
  std::uint32_t* keys_row = a.keys + static_cast<std::size_t>(row) * a.capacity;
  float* logits_row = a.logits + static_cast<std::size_t>(row) * a.capacity * rr;
  float vmax[max_group];
  double vsum[max_group];
#pragma unroll
  for (int h = 0; h < max_group; ++h) {
    vmax[h] = -::cuda::std::numeric_limits<float>::infinity();
    vsum[h] = 0.0;
  }
  switch (needs_lut ? a.m : 1) {  // m only matters where codes are read
#define PQKV_ADC_SCORE_CASE(MM)                                                                                  \
  case MM:                                                                                                         \
    score_tokens<MM, R>(a, agg, phase, lut, codes_row, logits_row, keys_row, hist_s, t0, t1, rr, s_max, s_inv_z, vmax, vsum); \
    break;
    PQKV_ADC_SCORE_CASE(1)
    PQKV_ADC_SCORE_CASE(2)
    PQKV_ADC_SCORE_CASE(4)
    PQKV_ADC_SCORE_CASE(8)
    PQKV_ADC_SCORE_CASE(16)
    PQKV_ADC_SCORE_CASE(32)
#undef PQKV_ADC_SCORE_CASE
    default:
      score_tokens<0, R>(a, agg, phase, lut, codes_row, logits_row, keys_row, hist_s, t0, t1, rr, s_max, s_inv_z, vmax, vsum);
      break;
  }

  if constexpr (Aggregation::needs_softmax) {
    if (phase != phase_score) {
      // Block reduction per q head: warp shuffles, then warps in order.
      int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
#pragma unroll
      for (int h = 0; h < max_group; ++h) {
        if (h < rr) {
          if (phase == phase_max) {
            float v = vmax[h];
            for (int o = 16; o > 0; o /= 2) {
              float const w = __shfl_xor_sync(0xffffffffu, v, o);
              v = w > v ? w : v;
            }
            if (lane == 0) { s_red[warp][h] = static_cast<double>(v); }
          } else {
            double v = vsum[h];
            for (int o = 16; o > 0; o /= 2) { v += __shfl_xor_sync(0xffffffffu, v, o); }
            if (lane == 0) { s_red[warp][h] = v; }
          }
        }
      }
      __syncthreads();
      int const h = static_cast<int>(threadIdx.x);
      if (h < rr) {
        std::size_t const at = (static_cast<std::size_t>(b) * a.q_heads + g * a.r + h) * a.max_chunks + chunk;
        if (phase == phase_max) {
          float v = static_cast<float>(s_red[0][h]);
          for (int w = 1; w < warps; ++w) {
            float const x = static_cast<float>(s_red[w][h]);
            v = x > v ? x : v;
          }
          a.part_max[at] = v;
        } else {
          double v = 0.0;
          for (int w = 0; w < warps; ++w) { v += s_red[w][h]; }
          a.part_sum[at] = v;
        }
      }
      return;
    }
  }
  __syncthreads();
  std::uint32_t* hist_g = a.hist + static_cast<std::size_t>(row) * radix_passes * hist_bins;
  for (int i = static_cast<int>(threadIdx.x); i < hist_bins; i += block_threads) {
    if (hist_s[i] != 0u) { atomicAdd(hist_g + i, hist_s[i]); }
  }
  __shared__ block_scan::TempStorage temp;
  __shared__ std::uint32_t s_pick[2];
  finish_pass(a, row, 0, ri.k_eff, ri.chunks, temp, s_pick);
}

// ---- selection kernels ---------------------------------------------------------------

/// grid (chunks, rows): histogram of the bits of `pass` (1 or 2) among the
/// chunk's keys that share the prefix resolved by the earlier passes.
template <int Unused = 0>
__global__ void __launch_bounds__(block_threads) refine_kernel(args a, int pass)
{
  __shared__ std::uint32_t hist_s[hist_bins];
  __shared__ block_scan::TempStorage temp;
  __shared__ std::uint32_t s_pick[2];
  int const chunk = static_cast<int>(blockIdx.x), row = static_cast<int>(blockIdx.y);
  row_info const ri = row_of(a, row / a.kv_heads);
  if (chunk >= ri.chunks || ri.k_eff == 0) { return; }
  for (int i = static_cast<int>(threadIdx.x); i < hist_bins; i += block_threads) { hist_s[i] = 0u; }
  __syncthreads();
  std::uint32_t* hist_row = a.hist + static_cast<std::size_t>(row) * radix_passes * hist_bins;
  threshold const th = load_threshold(a, row);
  int const prev_shift = pass_shift(pass - 1), shift = pass_shift(pass);
  std::uint32_t const digit_mask = static_cast<std::uint32_t>(pass_bins(pass) - 1);
  std::uint32_t const want = th.key >> prev_shift;
  index_t const t0 = ri.first + static_cast<index_t>(chunk) * a.chunk_tokens;
  index_t const t1 = t0 + a.chunk_tokens < ri.first + ri.count ? t0 + a.chunk_tokens : ri.first + ri.count;
  std::uint32_t const* keys_row = a.keys + static_cast<std::size_t>(row) * a.capacity;
  // The digits below the resolved prefix spread over the bins: plain atomics.
#pragma unroll 4
  for (index_t t = t0 + threadIdx.x; t < t1; t += block_threads) {
    std::uint32_t const key = keys_row[t];
    if ((key >> prev_shift) == want) { atomicAdd(hist_s + ((key >> shift) & digit_mask), 1u); }
  }
  __syncthreads();
  std::uint32_t* hist_g = hist_row + pass * hist_bins;
  for (int i = static_cast<int>(threadIdx.x); i < hist_bins; i += block_threads) {
    if (hist_s[i] != 0u) { atomicAdd(hist_g + i, hist_s[i]); }
  }
  finish_pass(a, row, pass, ri.k_eff, ri.chunks, temp, s_pick);
}

/// Block-wide sums of two per-thread counters, returned to every thread.
/// `s_red` is the caller's shared scratch of 2 x warps words.
__device__ __forceinline__ cuda::std::pair<std::uint32_t, std::uint32_t> block_sum_pair(
  std::uint32_t a, std::uint32_t b, std::uint32_t (&s_red)[2][warps])
{
  for (int o = 16; o > 0; o /= 2) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  if (lane == 0) {
    s_red[0][warp] = a;
    s_red[1][warp] = b;
  }
  __syncthreads();
  std::uint32_t a_sum = 0, b_sum = 0;
  for (int w = 0; w < warps; ++w) {
    a_sum += s_red[0][w];
    b_sum += s_red[1][w];
  }
  return {a_sum, b_sum};
}

/// grid (chunks, rows): how many of the chunk's keys are above the threshold
/// key T and how many equal it.
template <int Unused = 0>
__global__ void __launch_bounds__(block_threads) count_kernel(args a)
{
  __shared__ std::uint32_t s_red[2][warps];
  int const chunk = static_cast<int>(blockIdx.x), row = static_cast<int>(blockIdx.y);
  row_info const ri = row_of(a, row / a.kv_heads);
  if (chunk >= ri.chunks || ri.k_eff == 0) { return; }
  threshold const th = load_threshold(a, row);
  index_t const t0 = ri.first + static_cast<index_t>(chunk) * a.chunk_tokens;
  index_t const t1 = t0 + a.chunk_tokens < ri.first + ri.count ? t0 + a.chunk_tokens : ri.first + ri.count;
  std::uint32_t const* keys_row = a.keys + static_cast<std::size_t>(row) * a.capacity;
  std::uint32_t gt = 0, eq = 0;
#pragma unroll 4
  for (index_t t = t0 + threadIdx.x; t < t1; t += block_threads) {
    std::uint32_t const key = keys_row[t];
    gt += key > th.key ? 1u : 0u;
    eq += key == th.key ? 1u : 0u;
  }
  auto const [g_sum, e_sum] = block_sum_pair(gt, eq, s_red);
  if (threadIdx.x == 0) {
    std::uint32_t* cc = a.chunk_counts + (static_cast<std::size_t>(row) * a.max_chunks + chunk) * 2;
    cc[0] = g_sum;
    cc[1] = e_sum;
  }
}

/// grid (chunks, rows): writes the chunk's selected token indices in
/// ascending order at the offset the earlier chunks' counts give (keys above
/// T, then the lowest-index keys equal to T). Chunk 0 also writes the row's
/// valid count and the -1 padding.
template <int Unused = 0>
__global__ void __launch_bounds__(block_threads) emit_kernel(args a)
{
  __shared__ block_scan::TempStorage temp;
  __shared__ std::uint32_t s_red[2][warps];
  int const chunk = static_cast<int>(blockIdx.x), row = static_cast<int>(blockIdx.y);
  row_info const ri = row_of(a, row / a.kv_heads);
  std::int32_t* out_row = a.out + static_cast<std::size_t>(row) * a.out_k;
  if (chunk == 0) {
    for (int i = ri.k_eff + static_cast<int>(threadIdx.x); i < a.out_k; i += block_threads) { out_row[i] = -1; }
    if (threadIdx.x == 0) { a.valid[row] = ri.k_eff; }
  }
  if (chunk >= ri.chunks || ri.k_eff == 0) { return; }
  threshold const th = load_threshold(a, row);

  // Counts of the earlier chunks (their order is the token order).
  std::uint32_t gt = 0, eq = 0;
  std::uint32_t const* cc = a.chunk_counts + static_cast<std::size_t>(row) * a.max_chunks * 2;
  for (int c = static_cast<int>(threadIdx.x); c < chunk; c += block_threads) {
    gt += cc[2 * c];
    eq += cc[2 * c + 1];
  }
  auto [gt_before, eq_before] = block_sum_pair(gt, eq, s_red);
  std::uint32_t pos = gt_before + (eq_before < th.remaining ? eq_before : th.remaining);

  index_t const t0 = ri.first + static_cast<index_t>(chunk) * a.chunk_tokens;
  index_t const t1 = t0 + a.chunk_tokens < ri.first + ri.count ? t0 + a.chunk_tokens : ri.first + ri.count;
  std::uint32_t const* keys_row = a.keys + static_cast<std::size_t>(row) * a.capacity;
  // Tiles of emit_items consecutive tokens per thread: one pair of block
  // scans per tile keeps the order (thread by thread, then within a thread).
  constexpr index_t tile = static_cast<index_t>(block_threads) * emit_items;
  for (index_t base = t0; base < t1; base += tile) {
    index_t const tb = base + static_cast<index_t>(threadIdx.x) * emit_items;
    unsigned gt_bits = 0, eq_bits = 0;
#pragma unroll
    for (int i = 0; i < emit_items; ++i) {
      if (tb + i < t1) {
        std::uint32_t const key = keys_row[tb + i];
        gt_bits |= (key > th.key ? 1u : 0u) << i;
        eq_bits |= (key == th.key ? 1u : 0u) << i;
      }
    }
    std::uint32_t eq_rank = 0, eq_total = 0;
    block_scan(temp).ExclusiveSum(static_cast<std::uint32_t>(__popc(eq_bits)), eq_rank, eq_total);
    __syncthreads();
    unsigned sel_bits = gt_bits;
    std::uint32_t e = eq_before + eq_rank;
#pragma unroll
    for (int i = 0; i < emit_items; ++i) {
      if ((eq_bits >> i) & 1u) {
        sel_bits |= (e < th.remaining ? 1u : 0u) << i;
        ++e;
      }
    }
    std::uint32_t sel_rank = 0, sel_total = 0;
    block_scan(temp).ExclusiveSum(static_cast<std::uint32_t>(__popc(sel_bits)), sel_rank, sel_total);
    __syncthreads();
    std::uint32_t p = pos + sel_rank;
#pragma unroll
    for (int i = 0; i < emit_items; ++i) {
      if ((sel_bits >> i) & 1u) { out_row[p++] = static_cast<std::int32_t>(tb + i); }
    }
    pos += sel_total;
    eq_before += eq_total;
  }
}

// ---- launch ------------------------------------------------------------------------------

/// Workspace layout: offsets of each part, 256-byte aligned.
struct workspace_layout {
  std::size_t lut = 0, keys = 0, hist = 0, chunk_counts = 0, done = 0, state = 0, logits = 0, part_max = 0,
              part_sum = 0, total = 0;

  static workspace_layout make(index_t rows, index_t batch, int q_heads, int r, int m, int ksub, index_t capacity,
                               index_t max_chunks, bool softmax)
  {
    auto const up = [](std::size_t x) { return (x + 255) / 256 * 256; };
    auto const urows = static_cast<std::size_t>(rows), uchunks = static_cast<std::size_t>(max_chunks);
    workspace_layout w;
    std::size_t at = 0;
    w.lut = at;
    at += up(urows * static_cast<std::size_t>(m) * ksub * r * sizeof(float));
    w.keys = at;
    at += up(urows * static_cast<std::size_t>(capacity) * sizeof(std::uint32_t));
    w.hist = at;
    at += up(urows * radix_passes * hist_bins * sizeof(std::uint32_t));
    w.chunk_counts = at;
    at += up(urows * uchunks * 2 * sizeof(std::uint32_t));
    w.done = at;
    at += up(urows * radix_passes * sizeof(std::uint32_t));
    w.state = at;
    at += up(urows * 2 * sizeof(std::uint32_t));
    w.logits = at;
    at += up(softmax ? urows * static_cast<std::size_t>(capacity) * r * sizeof(float) : 0);
    std::size_t const partials = softmax ? static_cast<std::size_t>(batch) * q_heads * uchunks : 0;
    w.part_max = at;
    at += up(partials * sizeof(float));
    w.part_sum = at;
    at += up(partials * sizeof(double));
    w.total = at;
    return w;
  }
};

/// Sets the dynamic shared-memory limit of the score kernels this policy uses.
template <class Aggregation>
void prepare_score_kernels(std::size_t smem_bytes)
{
  auto const bytes = static_cast<int>(smem_bytes);
  PQKV_CUDA_TRY(cudaFuncSetAttribute(score_kernel<4, Aggregation>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  PQKV_CUDA_TRY(cudaFuncSetAttribute(score_kernel<0, Aggregation>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

/// Launches the whole chain on `stream`. `a` is complete; `chunks` is the
/// grid's x extent (chunks of the call's capacity).
template <class Aggregation>
void launch(args const& a, Aggregation const& agg, index_t batch, int chunks, cudaStream_t stream)
{
  auto const rows = static_cast<unsigned>(batch * a.kv_heads);
  if (rows == 0) { return; }
  dim3 const grid(static_cast<unsigned>(chunks), rows);
  auto const lut_z = static_cast<unsigned>((a.ksub + lut_centroids - 1) / lut_centroids);
  lut_kernel<><<<dim3(static_cast<unsigned>(a.m), rows, lut_z), block_threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
  std::size_t const smem = score_smem_bytes(a.m, a.ksub, a.r);
  auto score = [&](int phase) {
    if (a.r == 4) {
      score_kernel<4, Aggregation><<<grid, block_threads, smem, stream>>>(a, agg, phase);
    } else {
      score_kernel<0, Aggregation><<<grid, block_threads, smem, stream>>>(a, agg, phase);
    }
    PQKV_CUDA_CHECK_LAST();
  };
  if constexpr (Aggregation::needs_softmax) {
    score(phase_max);
    score(phase_sum);
  }
  score(phase_score);
  refine_kernel<><<<grid, block_threads, 0, stream>>>(a, 1);
  PQKV_CUDA_CHECK_LAST();
  refine_kernel<><<<grid, block_threads, 0, stream>>>(a, 2);
  PQKV_CUDA_CHECK_LAST();
  count_kernel<><<<grid, block_threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
  emit_kernel<><<<grid, block_threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

}  // namespace pqkv::detail::adc_gpu
