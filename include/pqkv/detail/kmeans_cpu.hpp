// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Bodies of `pqkv::cpu::kmeans_trainer`: packing, init, the fused
/// distance + argmin kernel, the centroid update and empty-cluster repair.
/// The contract these implement is written in codebook/kmeans.hpp.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#  include <immintrin.h>
#  define PQKV_KMEANS_AVX2 1
#endif

namespace pqkv::detail::kmeans {

/// Training rows per packed block: the kernel vectorizes over rows (tiles of
/// 16), so it needs no horizontal reduction.
inline constexpr index_t lanes = 16;
/// Centroids per packed group: the kernel's register tile is lanes x group.
inline constexpr index_t group = 4;
/// Largest squared sub-vector norm accepted: the GEMM-form distance
/// ||x||^2 - 2 x.c + ||c||^2 stays below FLT_MAX for any centroid in the hull.
inline constexpr double max_sq_norm = 1e37;

/// RNG streams of `pqkv::detail::random_*`; see kmeans.hpp for the contract.
enum class stream_tag : std::uint64_t { subsample = 1, random_sample = 2, kmeans_plus_plus = 3 };

[[nodiscard]] constexpr std::uint64_t stream_id(stream_tag tag, index_t head, index_t sub) noexcept
{
  return (static_cast<std::uint64_t>(tag) << 48) ^ (static_cast<std::uint64_t>(head) << 16) ^
         static_cast<std::uint64_t>(sub);
}

[[nodiscard]] constexpr index_t round_up(index_t x, index_t to) noexcept { return (x + to - 1) / to * to; }

/// Rows per work chunk of a Lloyd pass: a multiple of `lanes` that depends
/// only on the number of training rows: at most 16 chunks (each holds ksub x
/// dsub partial sums, zeroed and merged every pass), at least 1024 rows.
[[nodiscard]] constexpr index_t chunk_rows(index_t n) noexcept
{
  return std::max(round_up(1024, lanes), round_up((n + 15) / 16, lanes));
}

/// `count` distinct values of [0, n) drawn by a partial Fisher-Yates shuffle
/// driven by (seed, stream, i), in draw order. `scratch` has n entries.
inline void draw_distinct(std::uint64_t seed, std::uint64_t stream, index_t n, index_t count,
                          std::vector<index_t>& scratch, index_t* out)
{
  scratch.resize(static_cast<std::size_t>(n));
  std::iota(scratch.begin(), scratch.end(), index_t{0});
  for (index_t i = 0; i < count; ++i) {
    auto const j = i + static_cast<index_t>(random_below(seed, stream, static_cast<std::uint64_t>(i),
                                                         static_cast<std::uint64_t>(n - i)));
    std::swap(scratch[static_cast<std::size_t>(i)], scratch[static_cast<std::size_t>(j)]);
    out[i] = scratch[static_cast<std::size_t>(i)];
  }
}

/// Training rows of one head, packed per subspace.
struct packed_rows {
  index_t n = 0;       ///< rows
  index_t blocks = 0;  ///< ceil(n / lanes); lanes past n are zero
  index_t m = 0, dsub = 0;
  std::vector<float> xt;  // [m, blocks, dsub, lanes]
  std::vector<float> xn;  // [m, blocks * lanes]: squared norms, fma in channel order

  void resize(index_t rows, index_t subspaces, index_t sub_dim)
  {
    n = rows;
    m = subspaces;
    dsub = sub_dim;
    blocks = (rows + lanes - 1) / lanes;
    xt.assign(static_cast<std::size_t>(m * blocks * dsub * lanes), 0.f);
    xn.assign(static_cast<std::size_t>(m * blocks * lanes), 0.f);
  }
  [[nodiscard]] float const* xt_of(index_t s) const noexcept { return xt.data() + s * blocks * dsub * lanes; }
  /// Copies row i of subspace s to out[dsub].
  void copy_row(index_t s, index_t i, float* out) const noexcept
  {
    float const* x = xt_of(s) + (i / lanes) * dsub * lanes + i % lanes;
    for (index_t j = 0; j < dsub; ++j) { out[j] = x[j * lanes]; }
  }
  [[nodiscard]] float const* xn_of(index_t s) const noexcept { return xn.data() + s * blocks * lanes; }
};

/// Packs rows `row(i)`, i in [0, n), of head `h` (converted to float).
template <class Key, class RowFn>
void pack_rows(kv_view<Key const> keys, index_t h, index_t n, RowFn row, index_t m, index_t dsub, packed_rows& p)
{
  p.resize(n, m, dsub);
  Key const* const base = keys.data_handle() + h * keys.stride(0);
  index_t const st = keys.stride(1), sd = keys.stride(2);
  index_t const blocks_per_task = 64;
  cpu::parallel_for(cpu::chunk_count(p.blocks, blocks_per_task), [&](index_t task) {
    index_t const b0 = task * blocks_per_task, b1 = std::min(p.blocks, b0 + blocks_per_task);
    for (index_t i = b0 * lanes; i < std::min(n, b1 * lanes); ++i) {
      Key const* const src = base + row(i) * st;
      index_t const b = i / lanes, l = i % lanes;
      for (index_t s = 0; s < m; ++s) {
        float* const xt = p.xt.data() + ((s * p.blocks + b) * dsub) * lanes + l;
        float norm = 0.f;
        for (index_t j = 0; j < dsub; ++j) {
          float const v = pqkv::to_float(src[(s * dsub + j) * sd]);
          xt[j * lanes] = v;
          norm = std::fma(v, v, norm);
        }
        p.xn[static_cast<std::size_t>(s * p.blocks * lanes + i)] = norm;
      }
    }
  });
}

/// One (head, subspace) codebook in the kernel's layouts.
struct codebook_state {
  std::vector<float> c;   // [ksub, dsub]
  std::vector<float> ct;  // [kpad / group, dsub, group]: -2 c
  std::vector<float> cn;  // [kpad]: ||c||^2 (fma in channel order), +inf past ksub

  void resize(index_t ksub, index_t dsub)
  {
    index_t const kpad = round_up(ksub, group);
    c.assign(static_cast<std::size_t>(ksub * dsub), 0.f);
    ct.assign(static_cast<std::size_t>(kpad * dsub), 0.f);
    cn.assign(static_cast<std::size_t>(kpad), std::numeric_limits<float>::infinity());
  }
  /// Rebuilds ct and cn from c.
  void refresh(index_t ksub, index_t dsub)
  {
    for (index_t k = 0; k < ksub; ++k) {
      float const* ck = c.data() + k * dsub;
      float* const t = ct.data() + ((k / group) * dsub) * group + k % group;
      float norm = 0.f;
      for (index_t j = 0; j < dsub; ++j) {
        t[j * group] = -2.f * ck[j];
        norm = std::fma(ck[j], ck[j], norm);
      }
      cn[static_cast<std::size_t>(k)] = norm;
    }
  }
};

/// Portable kernel with the same float evaluation order as the AVX2 one:
/// acc = ||c||^2, then acc = fma(x_j, -2 c_j, acc) for j ascending; a centroid
/// replaces the best only when strictly smaller (lowest index wins ties).
/// Writes, per row of blocks [b0, b1), the best index and acc (||x||^2 not added).
inline void assign_blocks_generic(float const* xt, index_t b0, index_t b1, index_t dsub, float const* ct,
                                  float const* cn, index_t kpad, std::int32_t* idx, float* raw)
{
  for (index_t b = b0; b < b1; ++b) {
    float const* xb = xt + b * dsub * lanes;
    float best[lanes];
    std::int32_t bi[lanes];
    for (index_t l = 0; l < lanes; ++l) {
      best[l] = std::numeric_limits<float>::infinity();
      bi[l] = 0;
    }
    for (index_t k = 0; k < kpad; ++k) {
      float const* ck = ct + (k / group) * dsub * group + k % group;
      for (index_t l = 0; l < lanes; ++l) {
        float acc = cn[k];
        for (index_t j = 0; j < dsub; ++j) { acc = std::fma(xb[j * lanes + l], ck[j * group], acc); }
        if (acc < best[l]) {
          best[l] = acc;
          bi[l] = static_cast<std::int32_t>(k);
        }
      }
    }
    for (index_t l = 0; l < lanes; ++l) {
      idx[b * lanes + l] = bi[l];
      raw[b * lanes + l] = best[l];
    }
  }
}

#if defined(PQKV_KMEANS_AVX2)
/// The AVX2 tile: Pv vectors of 8 rows x 4 centroids of accumulators; the
/// running minimum and its index stay in registers across all centroids.
/// Pv = 2 fits the 16 ymm registers (8 acc, 2 x, 1 c, 4 state); Pv = 3 spills
/// and measured 20-25% slower at every dsub.
template <index_t Dsub, int Pv>
void assign_tile_avx2(float const* xb, index_t dsub, float const* ct, float const* cn, index_t kpad,
                      std::int32_t* idx, float* raw)
{
  static_assert(group == 4 && lanes % (8 * Pv) == 0);
  __m256 best[Pv];
  __m256i bi[Pv];
  for (int v = 0; v < Pv; ++v) {
    best[v] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    bi[v] = _mm256_setzero_si256();
  }
  for (index_t g = 0; g < kpad; g += group) {
    float const* cg = ct + g * dsub;
    __m256 acc[Pv][group];
    for (int k = 0; k < group; ++k) {
      __m256 const n = _mm256_broadcast_ss(cn + g + k);
      for (int v = 0; v < Pv; ++v) { acc[v][k] = n; }
    }
    for (index_t j = 0; j < dsub; ++j) {
      __m256 x[Pv];
      for (int v = 0; v < Pv; ++v) {
        x[v] = _mm256_loadu_ps(xb + j * lanes + 8 * v);
        // Keeps x in a register: folded into each FMA it would be loaded 4 times.
        __asm__("" : "+x"(x[v]));
      }
      for (int k = 0; k < group; ++k) {
        __m256 const c = _mm256_broadcast_ss(cg + j * group + k);
        for (int v = 0; v < Pv; ++v) { acc[v][k] = _mm256_fmadd_ps(x[v], c, acc[v][k]); }
      }
    }
    for (int k = 0; k < group; ++k) {
      __m256i const kv = _mm256_set1_epi32(static_cast<int>(g + k));
      for (int v = 0; v < Pv; ++v) {
        __m256 const lt = _mm256_cmp_ps(acc[v][k], best[v], _CMP_LT_OQ);
        best[v] = _mm256_min_ps(acc[v][k], best[v]);
        bi[v] = _mm256_blendv_epi8(bi[v], kv, _mm256_castps_si256(lt));
      }
    }
  }
  for (int v = 0; v < Pv; ++v) {
    _mm256_storeu_ps(raw + 8 * v, best[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + 8 * v), bi[v]);
  }
}

template <index_t Dsub, int Pv>
void assign_blocks_avx2(float const* xt, index_t b0, index_t b1, index_t dsub_rt, float const* ct,
                        float const* cn, index_t kpad, std::int32_t* idx, float* raw)
{
  index_t const dsub = Dsub > 0 ? Dsub : dsub_rt;
  for (index_t b = b0; b < b1; ++b) {
    for (index_t o = 0; o < lanes; o += 8 * Pv) {
      assign_tile_avx2<Dsub, Pv>(xt + b * dsub * lanes + o, dsub, ct, cn, kpad, idx + b * lanes + o,
                                 raw + b * lanes + o);
    }
  }
}
#endif

/// Nearest centroid (GEMM form, see assign_blocks_generic) of every row of
/// blocks [b0, b1). `kpad` is a multiple of `group`.
inline void assign_blocks(float const* xt, index_t b0, index_t b1, index_t dsub, float const* ct, float const* cn,
                          index_t kpad, std::int32_t* idx, float* raw)
{
#if defined(PQKV_KMEANS_AVX2)
  switch (dsub) {
    case 4: return assign_blocks_avx2<4, 2>(xt, b0, b1, dsub, ct, cn, kpad, idx, raw);
    case 8: return assign_blocks_avx2<8, 2>(xt, b0, b1, dsub, ct, cn, kpad, idx, raw);
    case 16: return assign_blocks_avx2<16, 2>(xt, b0, b1, dsub, ct, cn, kpad, idx, raw);
    case 32: return assign_blocks_avx2<32, 2>(xt, b0, b1, dsub, ct, cn, kpad, idx, raw);
    case 64: return assign_blocks_avx2<64, 2>(xt, b0, b1, dsub, ct, cn, kpad, idx, raw);
    case 128: return assign_blocks_avx2<128, 2>(xt, b0, b1, dsub, ct, cn, kpad, idx, raw);
    default: return assign_blocks_avx2<0, 2>(xt, b0, b1, dsub, ct, cn, kpad, idx, raw);
  }
#else
  assign_blocks_generic(xt, b0, b1, dsub, ct, cn, kpad, idx, raw);
#endif
}

/// Sum of a block's 16 D^2 values in double, as a fixed tree (what the AVX2
/// path computes): q_i = (d[i] + d[4+i]) + (d[8+i] + d[12+i]), then
/// (q_0 + q_1) + (q_2 + q_3).
inline double block_tree_sum(float const* d) noexcept
{
  double q[4];
  for (int i = 0; i < 4; ++i) {
    q[i] = (static_cast<double>(d[i]) + static_cast<double>(d[4 + i])) +
           (static_cast<double>(d[8 + i]) + static_cast<double>(d[12 + i]));
  }
  return (q[0] + q[1]) + (q[2] + q[3]);
}

/// Squared distance of every row of packed subspace `xt` to centroid `c`,
/// exact form: acc = fma(x_j - c_j, x_j - c_j, acc), j ascending, from 0.
/// Lowers d to it (rows past n must hold 0 and keep it), writes each block's
/// `block_tree_sum` of d to block_sum, and returns the sum of the block sums
/// in block order.
inline double min_distance_to(float const* xt, index_t blocks, index_t dsub, float const* c, float* d,
                              double* block_sum)
{
  static_assert(lanes == 16);
  index_t b = 0;
#if defined(PQKV_KMEANS_AVX2)
  // Two blocks at a time: four independent fma chains hide the latency.
  for (; b + 2 <= blocks; b += 2) {
    float const* x = xt + b * dsub * lanes;
    float const* y = x + dsub * lanes;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (index_t j = 0; j < dsub; ++j) {
      __m256 const cj = _mm256_broadcast_ss(c + j);
      __m256 const e0 = _mm256_sub_ps(_mm256_loadu_ps(x + j * lanes), cj);
      __m256 const e1 = _mm256_sub_ps(_mm256_loadu_ps(x + j * lanes + 8), cj);
      __m256 const e2 = _mm256_sub_ps(_mm256_loadu_ps(y + j * lanes), cj);
      __m256 const e3 = _mm256_sub_ps(_mm256_loadu_ps(y + j * lanes + 8), cj);
      a0 = _mm256_fmadd_ps(e0, e0, a0);
      a1 = _mm256_fmadd_ps(e1, e1, a1);
      a2 = _mm256_fmadd_ps(e2, e2, a2);
      a3 = _mm256_fmadd_ps(e3, e3, a3);
    }
    for (index_t k = 0; k < 2; ++k) {
      float* const db = d + (b + k) * lanes;
      // Padded rows hold 0 and stay 0 (min with a non-negative distance).
      __m256 const lo = _mm256_min_ps(_mm256_loadu_ps(db), k == 0 ? a0 : a2);
      __m256 const hi = _mm256_min_ps(_mm256_loadu_ps(db + 8), k == 0 ? a1 : a3);
      _mm256_storeu_ps(db, lo);
      _mm256_storeu_ps(db + 8, hi);
      __m256d const q = _mm256_add_pd(
        _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(lo)), _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1))),
        _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(hi)), _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1))));
      __m128d const q01 = _mm256_castpd256_pd128(q), q23 = _mm256_extractf128_pd(q, 1);
      double const sum = (_mm_cvtsd_f64(q01) + _mm_cvtsd_f64(_mm_unpackhi_pd(q01, q01))) +
                         (_mm_cvtsd_f64(q23) + _mm_cvtsd_f64(_mm_unpackhi_pd(q23, q23)));
      block_sum[b + k] = sum;
    }
  }
#endif
  for (; b < blocks; ++b) {
    float const* xb = xt + b * dsub * lanes;
    float* const db = d + b * lanes;
    for (index_t l = 0; l < lanes; ++l) {
      float acc = 0.f;
      for (index_t j = 0; j < dsub; ++j) {
        float const diff = xb[j * lanes + l] - c[j];
        acc = std::fma(diff, diff, acc);
      }
      db[l] = std::min(db[l], acc);
    }
    block_sum[b] = block_tree_sum(db);
  }
  double total = 0;
  for (b = 0; b < blocks; ++b) { total += block_sum[b]; }
  return total;
}

/// k-means++ (D^2 sampling) on one subspace; D^2 is min over chosen centroids
/// of the exact-form distance above. Centroid 0 is row random_below(n) at
/// counter 0. Centroid k >= 1: u = random_unit(counter k) * total (total: the
/// blocks' `block_tree_sum`s added in block order); walking blocks in
/// order with running = sum of the earlier block sums, the block where
/// running + block sum > u is entered and its rows added to running one by
/// one; the first row where running > u is taken (if rounding finds none
/// there, the walk goes on; if it finds none at all, the last row of positive
/// D^2). When total is 0, row random_below(n) at counter k.
inline void init_kmeans_plus_plus(packed_rows const& p, index_t s, index_t ksub, std::uint64_t seed,
                                  std::uint64_t stream, float* c, std::vector<float>& d, std::vector<double>& block_sum)
{
  index_t const n = p.n, dsub = p.dsub;
  float const* xt = p.xt_of(s);
  d.assign(static_cast<std::size_t>(p.blocks * lanes), 0.f);
  std::fill_n(d.begin(), n, std::numeric_limits<float>::infinity());  // padded rows stay at 0
  block_sum.resize(static_cast<std::size_t>(p.blocks));
  auto take = [&](index_t k, index_t row) { p.copy_row(s, row, c + k * dsub); };
  take(0, static_cast<index_t>(random_below(seed, stream, 0, static_cast<std::uint64_t>(n))));
  for (index_t k = 1; k < ksub; ++k) {
    double const total = min_distance_to(xt, p.blocks, dsub, c + (k - 1) * dsub, d.data(), block_sum.data());
    index_t pick = -1;
    if (total > 0) {
      double const u = random_unit(seed, stream, static_cast<std::uint64_t>(k)) * total;
      double running = 0;
      for (index_t b = 0; b < p.blocks && pick < 0; ++b) {
        double const next = running + block_sum[static_cast<std::size_t>(b)];
        if (next > u) {
          double within = running;
          for (index_t i = b * lanes; i < std::min(n, (b + 1) * lanes); ++i) {
            within += d[static_cast<std::size_t>(i)];
            if (within > u) {
              pick = i;
              break;
            }
          }
        }
        running = next;
      }
      if (pick < 0) {
        for (pick = n - 1; pick > 0 && d[static_cast<std::size_t>(pick)] <= 0.f; --pick) {}
      }
    } else {
      pick = static_cast<index_t>(random_below(seed, stream, static_cast<std::uint64_t>(k),
                                               static_cast<std::uint64_t>(n)));
    }
    take(k, pick);
  }
}

/// Per-(subspace, chunk) partial results of one Lloyd pass.
struct chunk_partial {
  std::vector<double> sums;           // [ksub, dsub]
  std::vector<std::int64_t> counts;   // [ksub]
  double objective = 0;
};

/// One head's training state; reused across heads of one `train` call.
struct head_state {
  packed_rows rows;
  std::vector<codebook_state> books;   // [m]
  std::vector<std::int32_t> assign;    // [m, blocks * lanes]
  std::vector<float> dist;             // [m, blocks * lanes]: clamped GEMM-form distance to the assigned centroid
  std::vector<chunk_partial> partials; // [m, chunks]
  index_t chunk = 0, chunks = 0;
};

/// Adds rows [0, valid) of packed block `xb` [dsub, lanes] into
/// sums[idx[l], :] (double), each sum receiving its rows in row order.
inline void accumulate_block(float const* xb, index_t dsub, std::int32_t const* idx, index_t valid, double* sums)
{
#if defined(PQKV_KMEANS_AVX2)
  if (dsub % 4 == 0 && valid == lanes) {
    // 4 rows x 4 channels at a time, transposed in registers so each row adds
    // as one vector: the same additions, in the same order, as the loop below.
    for (index_t l0 = 0; l0 < lanes; l0 += 4) {
      double* const s0 = sums + idx[l0] * dsub;
      double* const s1 = sums + idx[l0 + 1] * dsub;
      double* const s2 = sums + idx[l0 + 2] * dsub;
      double* const s3 = sums + idx[l0 + 3] * dsub;
      for (index_t j = 0; j < dsub; j += 4) {
        __m256d const r0 = _mm256_cvtps_pd(_mm_loadu_ps(xb + j * lanes + l0));
        __m256d const r1 = _mm256_cvtps_pd(_mm_loadu_ps(xb + (j + 1) * lanes + l0));
        __m256d const r2 = _mm256_cvtps_pd(_mm_loadu_ps(xb + (j + 2) * lanes + l0));
        __m256d const r3 = _mm256_cvtps_pd(_mm_loadu_ps(xb + (j + 3) * lanes + l0));
        __m256d const t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
        __m256d const t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
        _mm256_storeu_pd(s0 + j, _mm256_add_pd(_mm256_loadu_pd(s0 + j), _mm256_permute2f128_pd(t0, t2, 0x20)));
        _mm256_storeu_pd(s1 + j, _mm256_add_pd(_mm256_loadu_pd(s1 + j), _mm256_permute2f128_pd(t1, t3, 0x20)));
        _mm256_storeu_pd(s2 + j, _mm256_add_pd(_mm256_loadu_pd(s2 + j), _mm256_permute2f128_pd(t0, t2, 0x31)));
        _mm256_storeu_pd(s3 + j, _mm256_add_pd(_mm256_loadu_pd(s3 + j), _mm256_permute2f128_pd(t1, t3, 0x31)));
      }
    }
    return;
  }
#endif
  for (index_t l = 0; l < valid; ++l) {
    double* const sum = sums + idx[l] * dsub;
    for (index_t j = 0; j < dsub; ++j) { sum[j] += static_cast<double>(xb[j * lanes + l]); }
  }
}

/// Assigns every training row of subspace s's chunk `q` and accumulates the
/// chunk's sums, counts and objective (all in row order).
inline void lloyd_chunk(head_state& st, index_t s, index_t q, index_t ksub)
{
  packed_rows const& p = st.rows;
  index_t const dsub = p.dsub, stride = p.blocks * lanes, kpad = round_up(ksub, group);
  index_t const r0 = q * st.chunk, r1 = std::min(p.n, r0 + st.chunk);
  codebook_state const& cb = st.books[static_cast<std::size_t>(s)];
  std::int32_t* const assign = st.assign.data() + s * stride;
  float* const dist = st.dist.data() + s * stride;
  chunk_partial& part = st.partials[static_cast<std::size_t>(s * st.chunks + q)];
  std::fill(part.sums.begin(), part.sums.end(), 0.0);
  std::fill(part.counts.begin(), part.counts.end(), std::int64_t{0});
  float const* xn = p.xn_of(s);
  double obj = 0;
  for (index_t b = r0 / lanes; b * lanes < r1; ++b) {
    float const* xb = p.xt_of(s) + b * dsub * lanes;
    // Assign, then accumulate while the block is still in L1.
    assign_blocks(p.xt_of(s), b, b + 1, dsub, cb.ct.data(), cb.cn.data(), kpad, assign, dist);
    index_t const valid = std::min(lanes, r1 - b * lanes);
    accumulate_block(xb, dsub, assign + b * lanes, valid, part.sums.data());
    for (index_t i = b * lanes; i < b * lanes + valid; ++i) {
      float const d = std::max(0.f, dist[i] + xn[i]);
      dist[i] = d;
      obj += d;
      ++part.counts[static_cast<std::size_t>(assign[i])];
    }
  }
  part.objective = obj;
}

/// New centroids of subspace s from the last pass: the mean of each cluster
/// (double sums of chunks added in chunk order, divided, rounded to float);
/// empty clusters, ascending, take the rows farthest from their centroid in
/// that pass (distance descending, row ascending), one distinct row each.
inline void update_centroids(head_state& st, index_t s, index_t ksub, std::vector<double>& sums,
                             std::vector<std::int64_t>& counts, std::vector<index_t>& order)
{
  packed_rows const& p = st.rows;
  index_t const dsub = p.dsub;
  sums.assign(static_cast<std::size_t>(ksub * dsub), 0.0);
  counts.assign(static_cast<std::size_t>(ksub), 0);
  for (index_t q = 0; q < st.chunks; ++q) {
    chunk_partial const& part = st.partials[static_cast<std::size_t>(s * st.chunks + q)];
    for (std::size_t e = 0; e < sums.size(); ++e) { sums[e] += part.sums[e]; }
    for (std::size_t k = 0; k < counts.size(); ++k) { counts[k] += part.counts[k]; }
  }
  codebook_state& cb = st.books[static_cast<std::size_t>(s)];
  index_t empties = 0;
  for (index_t k = 0; k < ksub; ++k) {
    auto const cnt = counts[static_cast<std::size_t>(k)];
    if (cnt == 0) {
      ++empties;
      continue;
    }
    double const inv = 1.0 / static_cast<double>(cnt);
    for (index_t j = 0; j < dsub; ++j) {
      cb.c[static_cast<std::size_t>(k * dsub + j)] = static_cast<float>(sums[static_cast<std::size_t>(k * dsub + j)] * inv);
    }
  }
  if (empties > 0) {
    float const* dist = st.dist.data() + s * p.blocks * lanes;
    order.resize(static_cast<std::size_t>(p.n));
    std::iota(order.begin(), order.end(), index_t{0});
    std::partial_sort(order.begin(), order.begin() + empties, order.end(), [&](index_t a, index_t b) {
      return dist[a] > dist[b] || (dist[a] == dist[b] && a < b);
    });
    index_t next = 0;
    for (index_t k = 0; k < ksub; ++k) {
      if (counts[static_cast<std::size_t>(k)] != 0) { continue; }
      index_t const row = order[static_cast<std::size_t>(next++)];
      p.copy_row(s, row, cb.c.data() + k * dsub);
    }
  }
  cb.refresh(ksub, dsub);
}

/// What `train` hands back to `kmeans_trainer` (which makes the public report).
struct outcome {
  int iterations = 0;
  bool converged = true;
  std::vector<double> objective;  // [iterations + 1], mean over heads and rows
};

inline constexpr char const* train_where = "kmeans_trainer.train";

/// Throws, naming the first offending element in (head, token, channel)
/// order, unless every key is finite with squared sub-vector norms <= max_sq_norm.
template <class Key>
void check_keys(kv_view<Key const> keys, index_t m, index_t dsub)
{
  index_t const heads = keys.extent(0), tokens = keys.extent(1);
  index_t const per_task = 1024;
  index_t const tasks_per_head = cpu::chunk_count(tokens, per_task);
  struct finding {
    index_t t = -1, c = 0;
    float value = 0;
    double sq = -1;  // >= 0: the norm of subspace c was too large
  };
  std::vector<finding> found(static_cast<std::size_t>(heads * tasks_per_head));
  cpu::parallel_for(heads * tasks_per_head, [&](index_t task) {
    index_t const h = task / tasks_per_head, t0 = (task % tasks_per_head) * per_task;
    Key const* base = keys.data_handle() + h * keys.stride(0);
    for (index_t t = t0; t < std::min(tokens, t0 + per_task); ++t) {
      Key const* row = base + t * keys.stride(1);
      for (index_t s = 0; s < m; ++s) {
        double sq = 0;
        for (index_t j = 0; j < dsub; ++j) {
          float const v = pqkv::to_float(row[(s * dsub + j) * keys.stride(2)]);
          if (!std::isfinite(v)) {
            found[static_cast<std::size_t>(task)] = {t, s * dsub + j, v, -1};
            return;
          }
          sq += static_cast<double>(v) * v;
        }
        if (sq > max_sq_norm) {
          found[static_cast<std::size_t>(task)] = {t, s, 0.f, sq};
          return;
        }
      }
    }
  });
  for (index_t task = 0; task < heads * tasks_per_head; ++task) {
    finding const& f = found[static_cast<std::size_t>(task)];
    if (f.t < 0) { continue; }
    index_t const h = task / tasks_per_head;
    PQKV_EXPECTS(f.sq >= 0, train_where, "keys(", h, ", ", f.t, ", ", f.c, ")=", f.value, " is not finite");
    PQKV_EXPECTS(false, train_where, "keys(", h, ", ", f.t, ", subspace ", f.c, ") has squared norm ", f.sq,
                 " > ", max_sq_norm, "; rescale the keys");
  }
}

/// Trains every (head, subspace) problem; see codebook/kmeans.hpp.
template <class Key>
outcome train(pq_config const& cfg, kv_view<Key const> keys, centroids_view<float> out,
              codes_view<std::uint8_t> const* codes)
{
  // ---- validation: everything before any output is touched ----
  PQKV_EXPECTS(keys.extent(2) == cfg.dim, train_where, "keys.extent(2)=", keys.extent(2), ", config.dim=", cfg.dim);
  PQKV_EXPECTS(keys.extent(0) > 0, train_where, "keys.extent(0)=", keys.extent(0), ": no heads to train");
  PQKV_EXPECTS(keys.extent(1) > 0, train_where, "keys.extent(1)=", keys.extent(1), ": no tokens to train on");
  PQKV_EXPECTS(keys.data_handle() != nullptr, train_where, "keys.data_handle() is null");
  index_t const heads = keys.extent(0), tokens = keys.extent(1);
  index_t const m = cfg.m, dsub = cfg.dsub(), ksub = cfg.ksub();
  check_centroids(out, cfg, heads, train_where);
  if (codes != nullptr) {
    PQKV_EXPECTS(codes->extent(0) == heads, train_where, "codes.extent(0)=", codes->extent(0), ", heads=", heads);
    PQKV_EXPECTS(codes->extent(1) == tokens, train_where, "codes.extent(1)=", codes->extent(1), ", tokens=", tokens);
    PQKV_EXPECTS(codes->extent(2) == m, train_where, "codes.extent(2)=", codes->extent(2), ", config.m=", m);
    PQKV_EXPECTS(codes->data_handle() != nullptr, train_where, "codes.data_handle() is null");
  }
  check_keys(keys, m, dsub);
  if (cfg.init == init_method::provided) {
    float const* c = out.data_handle();
    for (index_t e = 0; e < element_count(out); ++e) {
      if (!std::isfinite(c[e])) {
        index_t const per_head = m * ksub * dsub, per_sub = ksub * dsub;
        PQKV_EXPECTS(false, train_where, "init=provided but centroids(", e / per_head, ", ", e % per_head / per_sub,
                     ", ", e % per_sub / dsub, ", ", e % dsub, ")=", c[e], " is not finite");
      }
    }
  }

  // ---- per head ----
  index_t const n = (cfg.max_train_points > 0 && cfg.max_train_points < tokens) ? cfg.max_train_points : tokens;
  bool const subsampled = n < tokens;
  index_t const kpad = round_up(ksub, group);
  head_state st;
  st.chunk = chunk_rows(n);
  st.chunks = cpu::chunk_count(n, st.chunk);
  st.books.resize(static_cast<std::size_t>(m));
  for (auto& b : st.books) { b.resize(ksub, dsub); }
  st.partials.resize(static_cast<std::size_t>(m * st.chunks));
  for (auto& p : st.partials) {
    p.sums.resize(static_cast<std::size_t>(ksub * dsub));
    p.counts.resize(static_cast<std::size_t>(ksub));
  }
  struct scratch {
    std::vector<double> sums;
    std::vector<std::int64_t> counts;
    std::vector<index_t> order, picks;
    std::vector<float> d;
    std::vector<double> block_sum;
  };
  std::vector<scratch> scr(static_cast<std::size_t>(m));
  std::vector<index_t> rows(static_cast<std::size_t>(n)), draw_scratch;
  std::vector<std::vector<double>> objective(static_cast<std::size_t>(heads * m));  // per problem
  std::vector<index_t> active;
  active.reserve(static_cast<std::size_t>(m));
  outcome result;

  // One Lloyd assignment pass over the active problems; appends their objectives.
  auto assign_pass = [&](index_t h) {
    cpu::parallel_for(static_cast<index_t>(active.size()) * st.chunks, [&](index_t task) {
      lloyd_chunk(st, active[static_cast<std::size_t>(task / st.chunks)], task % st.chunks, ksub);
    });
    for (index_t s : active) {
      double obj = 0;
      for (index_t q = 0; q < st.chunks; ++q) { obj += st.partials[static_cast<std::size_t>(s * st.chunks + q)].objective; }
      objective[static_cast<std::size_t>(h * m + s)].push_back(obj);
    }
  };

  for (index_t h = 0; h < heads; ++h) {
    if (subsampled) {
      draw_distinct(cfg.seed, stream_id(stream_tag::subsample, h, 0), tokens, n, draw_scratch, rows.data());
      std::sort(rows.begin(), rows.end());
    } else {
      std::iota(rows.begin(), rows.end(), index_t{0});
    }
    pack_rows(keys, h, n, [&](index_t i) { return rows[static_cast<std::size_t>(i)]; }, m, dsub, st.rows);
    st.assign.resize(static_cast<std::size_t>(m * st.rows.blocks * lanes));
    st.dist.resize(static_cast<std::size_t>(m * st.rows.blocks * lanes));

    // Init, one task per subspace.
    cpu::parallel_for(m, [&](index_t s) {
      codebook_state& cb = st.books[static_cast<std::size_t>(s)];
      if (n < ksub) {
        for (index_t k = 0; k < ksub; ++k) { st.rows.copy_row(s, k % n, cb.c.data() + k * dsub); }
      } else if (cfg.init == init_method::provided) {
        for (index_t k = 0; k < ksub; ++k) {
          for (index_t j = 0; j < dsub; ++j) { cb.c[static_cast<std::size_t>(k * dsub + j)] = out(h, s, k, j); }
        }
      } else if (cfg.init == init_method::random_sample) {
        scratch& sc = scr[static_cast<std::size_t>(s)];
        sc.picks.resize(static_cast<std::size_t>(ksub));
        draw_distinct(cfg.seed, stream_id(stream_tag::random_sample, h, s), n, ksub, sc.order, sc.picks.data());
        std::vector<index_t> const& picks = sc.picks;
        for (index_t k = 0; k < ksub; ++k) {
          st.rows.copy_row(s, picks[static_cast<std::size_t>(k)], cb.c.data() + k * dsub);
        }
      } else {
        scratch& sc = scr[static_cast<std::size_t>(s)];
        init_kmeans_plus_plus(st.rows, s, ksub, cfg.seed, stream_id(stream_tag::kmeans_plus_plus, h, s), cb.c.data(),
                              sc.d, sc.block_sum);
      }
      cb.refresh(ksub, dsub);
    });

    active.clear();
    for (index_t s = 0; s < m; ++s) { active.push_back(s); }
    assign_pass(h);
    int iters = 0;
    if (n < ksub) {
      active.clear();
    } else if (cfg.max_iter > 0) {
      // A problem keeps its last assignment (and centroids) once it stops.
      for (int it = 1; it <= cfg.max_iter && !active.empty(); ++it) {
        cpu::parallel_for(static_cast<index_t>(active.size()), [&](index_t a) {
          index_t const s = active[static_cast<std::size_t>(a)];
          scratch& sc = scr[static_cast<std::size_t>(s)];
          update_centroids(st, s, ksub, sc.sums, sc.counts, sc.order);
        });
        assign_pass(h);
        iters = it;
        std::erase_if(active, [&](index_t s) {
          auto const& obj = objective[static_cast<std::size_t>(h * m + s)];
          double const prev = obj[obj.size() - 2], cur = obj.back();
          return cfg.tol > 0 && prev - cur <= cfg.tol * prev;
        });
      }
    }
    result.iterations = std::max(result.iterations, iters);
    if (!active.empty()) { result.converged = false; }

    for (index_t s = 0; s < m; ++s) {
      float const* c = st.books[static_cast<std::size_t>(s)].c.data();
      for (index_t k = 0; k < ksub; ++k) {
        for (index_t j = 0; j < dsub; ++j) { out(h, s, k, j) = c[k * dsub + j]; }
      }
    }

    if (codes != nullptr) {
      if (subsampled) {  // assign every token to the final centroids
        pack_rows(keys, h, tokens, [](index_t i) { return i; }, m, dsub, st.rows);
        st.assign.resize(static_cast<std::size_t>(m * st.rows.blocks * lanes));
        st.dist.resize(static_cast<std::size_t>(m * st.rows.blocks * lanes));
        index_t const blocks_per_task = 64, tasks = cpu::chunk_count(st.rows.blocks, blocks_per_task);
        cpu::parallel_for(m * tasks, [&](index_t task) {
          index_t const s = task / tasks, b0 = (task % tasks) * blocks_per_task;
          index_t const stride = st.rows.blocks * lanes;
          codebook_state const& cb = st.books[static_cast<std::size_t>(s)];
          assign_blocks(st.rows.xt_of(s), b0, std::min(st.rows.blocks, b0 + blocks_per_task), dsub, cb.ct.data(),
                        cb.cn.data(), kpad, st.assign.data() + s * stride, st.dist.data() + s * stride);
        });
      }
      index_t const stride = st.rows.blocks * lanes;
      for (index_t t = 0; t < tokens; ++t) {
        for (index_t s = 0; s < m; ++s) {
          (*codes)(h, t, s) = static_cast<std::uint8_t>(st.assign[static_cast<std::size_t>(s * stride + t)]);
        }
      }
    }
  }

  // Objective history: a problem that stopped counts with its final value.
  result.objective.assign(static_cast<std::size_t>(result.iterations) + 1, 0.0);
  for (auto const& obj : objective) {
    for (std::size_t i = 0; i < result.objective.size(); ++i) { result.objective[i] += obj[std::min(i, obj.size() - 1)]; }
  }
  for (auto& v : result.objective) { v /= static_cast<double>(heads * n); }
  return result;
}

}  // namespace pqkv::detail::kmeans
