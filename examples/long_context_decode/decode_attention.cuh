// SPDX-License-Identifier: Apache-2.0
#pragma once
// The example's tiny reference decode-attention kernel: one query token per
// sequence, GQA 4, head dim 128, bf16 K/V, float math, over a set of rows that
// the caller describes (the "user's own attention" that pqkv composes with).
// It returns a partial state (output, natural-log LSE of the scaled logits)
// per q head, so parts over disjoint row sets combine exactly with
// `pqkv::gpu::merge_state(s)`. Each (sequence, KV head) row set is split over
// `splits` blocks (split-K, as in flash-decoding); the splits are merged by
// `pqkv::gpu::merge_states`.
//
// Row sets, per (sequence b, local KV head g), n = seq_lens[b]:
//   resident  the first min(sink, n) tokens (sink buffer), the last
//             min(window, n - sink) tokens (window ring, slot = position %
//             window), and the selected tokens that hit the hot cache;
//   fetched   the selected tokens that missed: their hot row (written by the
//             fetch) or, for a bypassed miss (no slot), the store's row read
//             zero-copy;
//   dense     every token [0, n), read zero-copy from the pinned store (check);
//   listed    sink and window as above and a token list, all from the store (check).

#include "synthetic_model.cuh"

#include <pqkv/attend/merge_state.cuh>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/views.hpp>

#include <cuda/std/limits>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lcd {

enum class row_set : int { resident, fetched, dense, listed };

/// Everything a partial attention reads; unused fields may be null.
struct attend_args {
  __nv_bfloat16 const* q = nullptr;       // [batch, heads * group, d]
  int batch = 1, heads = 8;               // local KV heads
  std::int32_t const* seq_lens = nullptr; // [batch] device
  int sink = 0, window = 0;
  __nv_bfloat16 const *sink_k = nullptr, *sink_v = nullptr;  // [batch, heads, sink, d]
  __nv_bfloat16 const *win_k = nullptr, *win_v = nullptr;    // [batch, heads, window, d] ring
  std::int32_t const* sel = nullptr;      // [batch, heads, kmax] token positions, -1 padded
  std::int32_t const* slots = nullptr;    // [batch, heads, kmax] hot rows, -1 padded / bypassed
  std::uint8_t const* hit = nullptr;      // [batch * heads, kmax] 1: resident before this step
  int kmax = 0;
  __nv_bfloat16 const *hot_k = nullptr, *hot_v = nullptr;    // [batch, heads, cap, d]
  std::int64_t cap = 0;
  __nv_bfloat16 const *store_k = nullptr, *store_v = nullptr;  // mapped [batch, heads, store_cap, d], this layer
  std::int64_t store_cap = 0;
  float scale = 0.08838834764831845f;     // 1 / sqrt(128)
};

namespace detail {

inline constexpr int attend_warps = 4;

__device__ __forceinline__ void load4(__nv_bfloat16 const* p, float (&x)[4])
{
  uint2 const raw = *reinterpret_cast<uint2 const*>(p);
  __nv_bfloat162 const a = *reinterpret_cast<__nv_bfloat162 const*>(&raw.x);
  __nv_bfloat162 const b = *reinterpret_cast<__nv_bfloat162 const*>(&raw.y);
  float2 const fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
  x[0] = fa.x;
  x[1] = fa.y;
  x[2] = fb.x;
  x[3] = fb.y;
}

struct row_ptrs {
  __nv_bfloat16 const* k;
  __nv_bfloat16 const* v;
};

/// Rows of item i of the set; k = null when the item is skipped.
template <row_set Set>
__device__ __forceinline__ row_ptrs item_rows(attend_args const& a, std::int64_t row, int n, int sc, int wc, std::int64_t i)
{
  constexpr int d = head_dim;
  row_ptrs r{nullptr, nullptr};
  if constexpr (Set == row_set::dense) {
    std::int64_t const at = (row * a.store_cap + i) * d;
    return {a.store_k + at, a.store_v + at};
  } else if constexpr (Set == row_set::fetched) {
    std::int64_t const j = row * a.kmax + i;
    std::int32_t const key = a.sel[j];
    if (key < 0 || a.hit[j] != 0) { return r; }
    std::int32_t const slot = a.slots[j];
    std::int64_t const at = slot >= 0 ? (row * a.cap + slot) * d : (row * a.store_cap + key) * d;
    return slot >= 0 ? row_ptrs{a.hot_k + at, a.hot_v + at} : row_ptrs{a.store_k + at, a.store_v + at};
  } else {
    if (i < sc) {
      if constexpr (Set == row_set::listed) {
        std::int64_t const at = (row * a.store_cap + i) * d;
        return {a.store_k + at, a.store_v + at};
      } else {
        std::int64_t const at = (row * a.sink + i) * d;
        return {a.sink_k + at, a.sink_v + at};
      }
    }
    i -= sc;
    if (i < wc) {
      std::int64_t const pos = n - wc + i;
      if constexpr (Set == row_set::listed) {
        std::int64_t const at = (row * a.store_cap + pos) * d;
        return {a.store_k + at, a.store_v + at};
      } else {
        std::int64_t const at = (row * a.window + pos % a.window) * d;
        return {a.win_k + at, a.win_v + at};
      }
    }
    i -= wc;
    std::int64_t const j = row * a.kmax + i;
    std::int32_t const key = a.sel[j];
    if (key < 0) { return r; }
    if constexpr (Set == row_set::listed) {
      std::int64_t const at = (row * a.store_cap + key) * d;
      return {a.store_k + at, a.store_v + at};
    } else {
      std::int32_t const slot = a.slots[j];
      if (slot < 0 || a.hit[j] == 0) { return r; }
      std::int64_t const at = (row * a.cap + slot) * d;
      return {a.hot_k + at, a.hot_v + at};
    }
  }
}

/// grid (batch * heads, splits), block 32 * attend_warps. Partial states
/// part_v [batch, splits, heads * group, d], part_lse [batch, splits, heads * group].
template <row_set Set>
__global__ void __launch_bounds__(32 * attend_warps) attend_kernel(attend_args a, float* part_v, float* part_lse)
{
  constexpr int d = head_dim;
  constexpr float neg_inf = -::cuda::std::numeric_limits<float>::infinity();
  __shared__ float sm_m[attend_warps][group], sm_l[attend_warps][group];
  __shared__ float sm_acc[attend_warps][group][d];
  std::int64_t const row = blockIdx.x;
  int const b = static_cast<int>(row / a.heads), g = static_cast<int>(row % a.heads);
  int const split = static_cast<int>(blockIdx.y), splits = static_cast<int>(gridDim.y);
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  int const n = a.seq_lens[b] < 0 ? 0 : a.seq_lens[b];
  int const sc = a.sink < n ? a.sink : n;
  int const wc = a.window < n - sc ? a.window : n - sc;
  std::int64_t count = 0;
  if constexpr (Set == row_set::dense) {
    count = n;
  } else if constexpr (Set == row_set::fetched) {
    count = a.kmax;
  } else {
    count = static_cast<std::int64_t>(sc) + wc + a.kmax;
  }

  float q[group][4];
#pragma unroll
  for (int h = 0; h < group; ++h) {
    load4(a.q + ((row * group + h) * d) + 4 * lane, q[h]);
#pragma unroll
    for (int e = 0; e < 4; ++e) { q[h][e] *= a.scale; }
  }
  float m[group], l[group], acc[group][4];
#pragma unroll
  for (int h = 0; h < group; ++h) {
    m[h] = neg_inf;
    l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) { acc[h][e] = 0.f; }
  }
  for (std::int64_t i = static_cast<std::int64_t>(split) * attend_warps + warp; i < count;
       i += static_cast<std::int64_t>(splits) * attend_warps) {
    row_ptrs const r = item_rows<Set>(a, row, n, sc, wc, i);
    if (r.k == nullptr) { continue; }
    float k[4], v[4];
    load4(r.k + 4 * lane, k);
    load4(r.v + 4 * lane, v);
    float s[group];
#pragma unroll
    for (int h = 0; h < group; ++h) {
      s[h] = q[h][0] * k[0] + q[h][1] * k[1] + q[h][2] * k[2] + q[h][3] * k[3];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int h = 0; h < group; ++h) { s[h] += __shfl_xor_sync(0xffffffffu, s[h], off); }
    }
#pragma unroll
    for (int h = 0; h < group; ++h) {
      float const mn = fmaxf(m[h], s[h]);
      float const c = expf(m[h] - mn);  // 0 when m was -inf
      float const p = expf(s[h] - mn);
      l[h] = l[h] * c + p;
#pragma unroll
      for (int e = 0; e < 4; ++e) { acc[h][e] = acc[h][e] * c + p * v[e]; }
      m[h] = mn;
    }
  }
#pragma unroll
  for (int h = 0; h < group; ++h) {
    if (lane == 0) {
      sm_m[warp][h] = m[h];
      sm_l[warp][h] = l[h];
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) { sm_acc[warp][h][4 * lane + e] = acc[h][e]; }
  }
  __syncthreads();
  int const t = static_cast<int>(threadIdx.x);  // one output channel per thread (32 * attend_warps == d)
  std::int64_t const out_row = (static_cast<std::int64_t>(b) * splits + split) * (a.heads * group) + g * group;
  for (int h = 0; h < group; ++h) {
    float mx = neg_inf;
    for (int w = 0; w < attend_warps; ++w) { mx = fmaxf(mx, sm_m[w][h]); }
    float o = 0.f, lse = neg_inf;
    if (mx != neg_inf) {
      float z = 0.f, acc_t = 0.f;
      for (int w = 0; w < attend_warps; ++w) {
        float const c = sm_m[w][h] == neg_inf ? 0.f : expf(sm_m[w][h] - mx);
        z += sm_l[w][h] * c;
        acc_t += sm_acc[w][h][t] * c;
      }
      o = acc_t / z;
      lse = mx + logf(z);
    }
    part_v[(out_row + h) * d + t] = o;
    if (t == 0) { part_lse[out_row + h] = lse; }
  }
}

/// Scaled logits of every token: logits [batch, heads * group, n_stride] for
/// tokens [0, seq_lens[b]) read from the store. grid (batch * heads,
/// ceil(n_stride / (attend_warps * 16))), block 32 * attend_warps.
__global__ void __launch_bounds__(32 * attend_warps) logits_kernel(attend_args a, float* logits, std::int64_t n_stride)
{
  constexpr int d = head_dim;
  std::int64_t const row = blockIdx.x;
  int const b = static_cast<int>(row / a.heads);
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  std::int64_t const n = a.seq_lens[b] < n_stride ? a.seq_lens[b] : n_stride;
  float q[group][4];
#pragma unroll
  for (int h = 0; h < group; ++h) {
    load4(a.q + ((row * group + h) * d) + 4 * lane, q[h]);
#pragma unroll
    for (int e = 0; e < 4; ++e) { q[h][e] *= a.scale; }
  }
  std::int64_t const first = static_cast<std::int64_t>(blockIdx.y) * attend_warps * 16;
  for (int j = 0; j < 16; ++j) {
    std::int64_t const t = first + static_cast<std::int64_t>(j) * attend_warps + warp;
    if (t >= n) { break; }
    float k[4];
    load4(a.store_k + (row * a.store_cap + t) * d + 4 * lane, k);
    float s[group];
#pragma unroll
    for (int h = 0; h < group; ++h) {
      s[h] = q[h][0] * k[0] + q[h][1] * k[1] + q[h][2] * k[2] + q[h][3] * k[3];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int h = 0; h < group; ++h) { s[h] += __shfl_xor_sync(0xffffffffu, s[h], off); }
    }
    if (lane == 0) {
#pragma unroll
      for (int h = 0; h < group; ++h) { logits[(row * group + h) * n_stride + t] = s[h]; }
    }
  }
}

}  // namespace detail

/// Partial attention over one row set: the split kernel, then the exact
/// merge of the splits with `pqkv::gpu::merge_states`. Workspace: part_v
/// [batch, splits, heads * group, d], part_lse [batch, splits, heads * group];
/// outputs out_v [batch, heads * group, d], out_lse [batch, heads * group]
/// (float). Nothing allocated, no sync; capturable.
template <row_set Set>
void attend(attend_args const& a, int splits, float* part_v, float* part_lse, float* out_v, float* out_lse,
            cudaStream_t stream)
{
  PQKV_EXPECTS(splits >= 1 && splits <= 65535, "lcd::attend", "splits=", splits, " is outside [1, 65535]");
  dim3 const grid(static_cast<unsigned>(a.batch * a.heads), static_cast<unsigned>(splits));
  detail::attend_kernel<Set><<<grid, 32 * detail::attend_warps, 0, stream>>>(a, part_v, part_lse);
  PQKV_CUDA_CHECK_LAST();
  pqkv::index_t const b = a.batch, s = splits, hq = static_cast<pqkv::index_t>(a.heads) * group;
  pqkv::gpu::merge_states<float>(pqkv::make_view(static_cast<float const*>(part_v), b, s, hq, pqkv::index_t{head_dim}),
                                 pqkv::make_view(static_cast<float const*>(part_lse), b, s, hq),
                                 pqkv::make_view(out_v, b, hq, pqkv::index_t{head_dim}), pqkv::make_view(out_lse, b, hq),
                                 stream);
}

/// Scaled logits [batch, heads * group, n_stride] of all tokens (check).
inline void logits(attend_args const& a, float* out, std::int64_t n_stride, cudaStream_t stream)
{
  std::int64_t const per_block = detail::attend_warps * 16;
  dim3 const grid(static_cast<unsigned>(a.batch * a.heads), static_cast<unsigned>((n_stride + per_block - 1) / per_block));
  detail::logits_kernel<<<grid, 32 * detail::attend_warps, 0, stream>>>(a, out, n_stride);
  PQKV_CUDA_CHECK_LAST();
}

}  // namespace lcd
