// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of `pqkv::gpu::block_sparse_attention` and the GPU
/// calibration's error reduction (sparse/block_sparse_attention.cuh,
/// sparse/calibrate.cuh). Users never name this header.

#include <pqkv/core/dtype.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/strided3.cuh>

#include <cuda_runtime.h>

#include <cstdint>

namespace pqkv::detail::bsa_gpu {

inline constexpr int threads = 256;          ///< 8 warps per CTA
inline constexpr int warps = threads / 32;
inline constexpr int rows_per_warp = 4;      ///< q rows a warp owns in one pass
inline constexpr int pass_rows = warps * rows_per_warp;  ///< 32 q rows per pass over the keys
inline constexpr int chunk = 32;             ///< keys staged in shared memory at a time (one per lane)
inline constexpr int max_dv = 256;           ///< value width: a multiple of 32 up to this
inline constexpr int dv_slots = max_dv / 32; ///< value columns per lane

/// Dynamic shared memory of the attention kernel: Q pass [32][D], K chunk
/// [32][D + 1] (padded: lane j reads row j), V chunk [32][dv] (float).
constexpr std::size_t attention_smem(int dim, int dv) noexcept
{
  return static_cast<std::size_t>(pass_rows * dim + chunk * (dim + 1) + chunk * dv) * sizeof(float);
}


/// Writable float [heads, tokens, dv] strided device tensor.
struct out3 {
  float* p;
  index_t s0, s1, s2;
  __device__ __forceinline__ float& operator()(index_t h, index_t t, index_t c) const
  {
    return p[h * s0 + t * s1 + c * s2];
  }
};

/// Scalars of one attention launch.
struct attention_args {
  int q_heads, kv_heads, q_blocks, words, max_len, block_q, block_k, dv;
  float scale;
};

__device__ __forceinline__ float warp_max(float x)
{
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) { x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o)); }
  return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) { x += __shfl_xor_sync(0xffffffffu, x, o); }
  return x;
}

/// One CTA per (q block, q head, sequence): blockIdx (qb, h, s). The CTA
/// walks its q block in passes of 32 rows (8 warps x 4 rows); per pass it
/// visits the causal key blocks whose bit is set (every causal block when
/// `bits` is null: the dense mode) in ascending order, stages them through
/// shared memory 32 keys at a time and updates each row's online softmax:
/// lane j computes the logit of key j for the warp's 4 rows (the reference's
/// ascending fma chain, then one rounded multiply by the scale: the same
/// float logits as the CPU), the warp reduces max and sum, and lane l keeps
/// value columns l, l + 32, ... of every row in registers.
///
/// Sequence lengths come from `cu` (device); a sequence longer than max_len
/// is cut to max_len (its later rows are not written) so that no bit past
/// the mask's words is read.
template <class T, class Ve, int D>
__global__ void __launch_bounds__(threads)
    attention_kernel(strided3<T> q, strided3<T> k, strided3<Ve> v, std::int32_t const* __restrict__ cu,
                     std::uint32_t const* __restrict__ bits, attention_args a, out3 out)
{
  extern __shared__ float smem[];
  float* const qs = smem;                             // [pass_rows][D]
  float* const ks = qs + pass_rows * D;               // [chunk][D + 1]
  float* const vs = ks + chunk * (D + 1);             // [chunk][dv]
  int const qb = static_cast<int>(blockIdx.x), h = static_cast<int>(blockIdx.y), s = static_cast<int>(blockIdx.z);
  int const t0 = cu[s];
  int const n = min(cu[s + 1] - t0, a.max_len);
  int const q0 = qb * a.block_q;
  if (q0 >= n) { return; }  // padding q block: no row
  int const q_end = min(q0 + a.block_q, n);
  int const nk = (q_end - 1) / a.block_k + 1;  // causal key blocks
  int const g = h / (a.q_heads / a.kv_heads);
  std::uint32_t const* const row_bits =
      bits == nullptr ? nullptr
                      : bits + ((static_cast<index_t>(s) * a.q_heads + h) * a.q_blocks + qb) * a.words;
  int const warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  int const dvs = a.dv / 32;

  for (int p0 = q0; p0 < q_end; p0 += pass_rows) {
    int const rows = min(pass_rows, q_end - p0);
    int const last = p0 + rows - 1;  // the pass's last position: no key after it is causal
    __syncthreads();                 // the previous pass is done with qs
    for (int i = static_cast<int>(threadIdx.x); i < pass_rows * D; i += threads) {
      int const r = i / D, c = i % D;
      qs[i] = r < rows ? q(h, t0 + p0 + r, c) : 0.f;
    }
    float m[rows_per_warp], l[rows_per_warp], acc[rows_per_warp][dv_slots];
#pragma unroll
    for (int r = 0; r < rows_per_warp; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.f;
#pragma unroll
      for (int t = 0; t < dv_slots; ++t) { acc[r][t] = 0.f; }
    }
    for (int kb = 0; kb < nk && kb * a.block_k <= last; ++kb) {
      if (row_bits != nullptr && ((row_bits[kb / 32] >> (kb % 32)) & 1u) == 0u) { continue; }  // CTA-uniform
      int const j_end = min((kb + 1) * a.block_k, last + 1);
      for (int j0 = kb * a.block_k; j0 < j_end; j0 += chunk) {
        int const nj = min(chunk, j_end - j0);
        __syncthreads();  // the previous chunk is consumed (and qs written, on the first)
        for (int i = static_cast<int>(threadIdx.x); i < chunk * D; i += threads) {
          int const j = i / D, c = i % D;
          ks[j * (D + 1) + c] = j < nj ? k(g, t0 + j0 + j, c) : 0.f;
        }
        for (int i = static_cast<int>(threadIdx.x); i < chunk * a.dv; i += threads) {
          int const j = i / a.dv, c = i % a.dv;
          vs[i] = j < nj ? v(g, t0 + j0 + j, c) : 0.f;
        }
        __syncthreads();
        // Logits of key j0 + lane for the warp's rows: ascending fma chains.
        float dot[rows_per_warp];
#pragma unroll
        for (int r = 0; r < rows_per_warp; ++r) { dot[r] = 0.f; }
        float const* const kr = ks + lane * (D + 1);
        float const* const qr = qs + warp * rows_per_warp * D;
#pragma unroll 8
        for (int c = 0; c < D; ++c) {
          float const kc = kr[c];
#pragma unroll
          for (int r = 0; r < rows_per_warp; ++r) { dot[r] = __fmaf_rn(qr[r * D + c], kc, dot[r]); }
        }
        int const j = j0 + lane;
#pragma unroll
        for (int r = 0; r < rows_per_warp; ++r) {
          int const rl = warp * rows_per_warp + r;
          int const p = p0 + rl;  // position of this row
          bool const live = rl < rows && lane < nj && j <= p;
          float const x = live ? __fmul_rn(a.scale, dot[r]) : -INFINITY;
          float const cmax = warp_max(x);
          if (cmax == -INFINITY) { continue; }  // warp-uniform: no key of this chunk for the row
          float const m_new = fmaxf(m[r], cmax);
          float const alpha = expf(m[r] - m_new);  // 0 on the row's first keys (m = -inf)
          float const w = live ? expf(x - m_new) : 0.f;
          l[r] = l[r] * alpha + warp_sum(w);
#pragma unroll
          for (int t = 0; t < dv_slots; ++t) { acc[r][t] *= alpha; }
          for (int jj = 0; jj < nj; ++jj) {
            float const wj = __shfl_sync(0xffffffffu, w, jj);
            float const* const vr = vs + jj * a.dv + lane;
#pragma unroll
            for (int t = 0; t < dv_slots; ++t) {
              if (t < dvs) { acc[r][t] = __fmaf_rn(wj, vr[32 * t], acc[r][t]); }
            }
          }
          m[r] = m_new;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < rows_per_warp; ++r) {
      int const rl = warp * rows_per_warp + r;
      if (rl >= rows) { continue; }
      float const inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no attended key: 0, as the reference
#pragma unroll
      for (int t = 0; t < dv_slots; ++t) {
        if (t < dvs) { out(h, t0 + p0 + rl, lane + 32 * t) = acc[r][t] * inv; }
      }
    }
  }
}

inline constexpr int l1_threads = 256;

/// Partial sums of |a - b| (double) of head blockIdx.y over token chunk
/// blockIdx.x (`rows` tokens per chunk), into part [heads, chunks]: a fixed
/// assignment and a fixed-order tree, so the result is the same every run.
template <int Unused = 0>
__global__ void __launch_bounds__(l1_threads)
    l1_partial_kernel(float const* __restrict__ a, float const* __restrict__ b, index_t tokens, int dv, int rows,
                      double* __restrict__ part)
{
  __shared__ double red[l1_threads];
  int const h = static_cast<int>(blockIdx.y), chunks = static_cast<int>(gridDim.x);
  index_t const t0 = static_cast<index_t>(blockIdx.x) * rows;
  index_t const t1 = t0 + rows < tokens ? t0 + rows : tokens;
  index_t const base = static_cast<index_t>(h) * tokens * dv;
  double sum = 0.0;
  for (index_t i = t0 * dv + threadIdx.x; i < t1 * dv; i += l1_threads) {
    sum += fabs(static_cast<double>(a[base + i]) - static_cast<double>(b[base + i]));
  }
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int o = l1_threads / 2; o > 0; o >>= 1) {
    if (static_cast<int>(threadIdx.x) < o) { red[threadIdx.x] += red[threadIdx.x + o]; }
    __syncthreads();
  }
  if (threadIdx.x == 0) { part[static_cast<index_t>(h) * chunks + blockIdx.x] = red[0]; }
}

/// err[h] = (sum of part[h, 0..chunks) ascending) / tokens, 0 with no token.
template <int Unused = 0>
__global__ void l1_final_kernel(double const* __restrict__ part, int heads, int chunks, index_t tokens,
                                double* __restrict__ err)
{
  int const h = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (h >= heads) { return; }
  double sum = 0.0;
  for (int c = 0; c < chunks; ++c) { sum += part[static_cast<index_t>(h) * chunks + c]; }
  err[h] = tokens > 0 ? sum / static_cast<double>(tokens) : 0.0;
}

}  // namespace pqkv::detail::bsa_gpu
