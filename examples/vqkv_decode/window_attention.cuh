// SPDX-License-Identifier: Apache-2.0
#pragma once
// The example's own decode attention, standing for the user's kernel that
// pqkv composes with: one query token, q head h reads KV head h / group, bf16
// K and V, float math, head dim 128, split-K over the rows (flash-decoding
// style). It gives partial states (output, natural-log LSE of the scaled
// logits) per q head, merged by `pqkv::gpu::merge_states`, so attention over
// the 16-bit rows merges exactly with `pqkv::gpu::code_attention` over the
// codes.
//
// Row sets of KV head g, with n = *length and e = *coded read on the device:
//   window  the sink rows [0, min(n, sink)) and the tokens [sink + e, n) from
//           their ring slots (p - sink) % ring, as `pqkv::gpu::rq_window`
//           keeps them;
//   dense   every token [0, n) of a [kv_heads, capacity, dim] array (the
//           reference the example compares against).

#include <pqkv/attend/merge_state.cuh>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/views.hpp>

#include <cuda/std/limits>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vq {

using bf16 = __nv_bfloat16;
using pqkv::index_t;

enum class row_set : int { window, dense };

/// What a partial attention reads.
struct attend_args {
  float const* q = nullptr;  // [q_heads, 128]
  int q_heads = 32, group = 4;
  index_t const* length = nullptr;  // device: tokens held
  index_t const* coded = nullptr;   // device: tokens held as codes (window set)
  bf16 const *sink_k = nullptr, *sink_v = nullptr;  // [kv_heads, sink, 128]
  bf16 const *ring_k = nullptr, *ring_v = nullptr;  // [kv_heads, ring, 128]
  index_t sink = 0, ring = 1;
  bf16 const *all_k = nullptr, *all_v = nullptr;  // [kv_heads, capacity, 128]
  index_t capacity = 0;
  float scale = 0.08838834764831845f;  // 1 / sqrt(128)
};

namespace detail {

inline constexpr int dim = 128;
inline constexpr int warps = 4;

/// Rows of item i of KV head g's set.
template <row_set Set>
__device__ __forceinline__ void item_rows(attend_args const& a, index_t g, index_t n, index_t sink_count,
                                          index_t coded, index_t i, bf16 const*& k, bf16 const*& v)
{
  if constexpr (Set == row_set::dense) {
    k = a.all_k + (g * a.capacity + i) * dim;
    v = a.all_v + (g * a.capacity + i) * dim;
  } else {
    if (i < sink_count) {
      k = a.sink_k + (g * a.sink + i) * dim;
      v = a.sink_v + (g * a.sink + i) * dim;
      return;
    }
    index_t const p = a.sink + coded + (i - sink_count), slot = (p - a.sink) % a.ring;
    k = a.ring_k + (g * a.ring + slot) * dim;
    v = a.ring_v + (g * a.ring + slot) * dim;
  }
}

__device__ __forceinline__ void load4(bf16 const* p, float (&x)[4])
{
  uint2 const raw = *reinterpret_cast<uint2 const*>(p);
  float2 const a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 const*>(&raw.x));
  float2 const b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 const*>(&raw.y));
  x[0] = a.x;
  x[1] = a.y;
  x[2] = b.x;
  x[3] = b.y;
}

/// grid (q_heads, splits), 4 warps; lane l holds channels 4l..4l+3. Split s
/// takes items [s * per, (s + 1) * per); each warp runs an online softmax over
/// every 4th of them, and the warps merge in shared memory.
template <row_set Set>
__global__ void __launch_bounds__(32 * warps) attend_kernel(attend_args a, float* part_v, float* part_lse)
{
  int const h = static_cast<int>(blockIdx.x), split = static_cast<int>(blockIdx.y), splits = static_cast<int>(gridDim.y);
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  index_t const g = h / a.group, n = *a.length;
  index_t const coded = Set == row_set::window ? *a.coded : 0;
  index_t const sink_count = Set == row_set::window ? (n < a.sink ? n : a.sink) : 0;
  index_t const items = Set == row_set::dense ? n : sink_count + (n > a.sink + coded ? n - a.sink - coded : 0);
  index_t const per = (items + splits - 1) / splits, first = split * per;
  index_t const last = first + per < items ? first + per : items;

  float q[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) { q[c] = a.q[h * dim + lane * 4 + c]; }
  float m = -cuda::std::numeric_limits<float>::infinity(), l = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (index_t i = first + warp; i < last; i += warps) {
    bf16 const *kr = nullptr, *vr = nullptr;
    item_rows<Set>(a, g, n, sink_count, coded, i, kr, vr);
    float k4[4], v4[4];
    load4(kr + lane * 4, k4);
    load4(vr + lane * 4, v4);
    float s = q[0] * k4[0] + q[1] * k4[1] + q[2] * k4[2] + q[3] * k4[3];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) { s += __shfl_xor_sync(0xffffffffu, s, o); }
    s *= a.scale;
    float const m_new = fmaxf(m, s), alpha = __expf(m - m_new), p = __expf(s - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int c = 0; c < 4; ++c) { acc[c] = acc[c] * alpha + p * v4[c]; }
    m = m_new;
  }

  __shared__ float sm_m[warps], sm_l[warps], sm_acc[warps][dim];
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) { sm_acc[warp][lane * 4 + c] = acc[c]; }
  __syncthreads();
  if (warp != 0) { return; }
  float mm = -cuda::std::numeric_limits<float>::infinity();
  for (int w = 0; w < warps; ++w) { mm = fmaxf(mm, sm_m[w]); }
  float ll = 0.f, out[4] = {0.f, 0.f, 0.f, 0.f};
  if (mm != -cuda::std::numeric_limits<float>::infinity()) {
    for (int w = 0; w < warps; ++w) {
      if (sm_l[w] == 0.f) { continue; }
      float const wgt = __expf(sm_m[w] - mm);
      ll += sm_l[w] * wgt;
#pragma unroll
      for (int c = 0; c < 4; ++c) { out[c] += sm_acc[w][lane * 4 + c] * wgt; }
    }
  }
  float* const pv = part_v + (static_cast<index_t>(split) * a.q_heads + h) * dim;
#pragma unroll
  for (int c = 0; c < 4; ++c) { pv[lane * 4 + c] = ll > 0.f ? out[c] / ll : 0.f; }
  if (lane == 0) {
    part_lse[split * a.q_heads + h] = ll > 0.f ? mm + logf(ll) : -cuda::std::numeric_limits<float>::infinity();
  }
}

}  // namespace detail

/// Attention of every q head over `Set`, split `splits` ways: partials in
/// part_v [splits, q_heads, 128] and part_lse [splits, q_heads], merged into
/// out_v [q_heads, 128] and out_lse [q_heads]. Graph-capturable.
template <row_set Set>
void attend(attend_args const& a, int splits, float* part_v, float* part_lse, float* out_v, float* out_lse,
            cudaStream_t stream)
{
  detail::attend_kernel<Set><<<dim3(static_cast<unsigned>(a.q_heads), static_cast<unsigned>(splits)),
                               32 * detail::warps, 0, stream>>>(a, part_v, part_lse);
  PQKV_CUDA_CHECK_LAST();
  index_t const h = a.q_heads, d = detail::dim, s = splits;
  // States-major buffers seen as [rows = 1, S, heads, dim].
  auto const v = pqkv::make_strided_view<float const, 4>(part_v, {1, s, h, d}, {s * h * d, h * d, d, 1});
  auto const lse = pqkv::make_strided_view<float const, 3>(part_lse, {1, s, h}, {s * h, h, 1});
  pqkv::gpu::merge_states<float>(v, lse, pqkv::make_strided_view<float, 3>(out_v, {1, h, d}, {h * d, d, 1}),
                                 pqkv::make_strided_view<float, 2>(out_lse, {1, h}, {h, 1}), stream);
}

}  // namespace vq
