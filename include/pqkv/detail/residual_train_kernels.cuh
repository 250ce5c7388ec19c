// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of `pqkv::gpu::rq_trainer` (codebook/residual.cuh): the
/// permuted float copy of the training rows, the residual update after a
/// stage, and the deterministic mean squared residual norm.
///
/// The residual R is [rows_total, dim] float (the permuted rows, head-major),
/// which is the same memory whether the codebooks are per head ([heads,
/// tokens, dim]) or shared ([1, heads * tokens, dim]). Squared norms are
/// summed in double: each thread over a fixed element set, each block by a
/// fixed tree, and the blocks' partials by one block in block order; the grid
/// comes from the element count alone, so the sum does not depend on the
/// device.

#include <pqkv/core/config.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/detail/residual_gpu_kernels.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace pqkv::detail::rq_train {

inline constexpr int threads = 256;
inline constexpr int max_blocks = 1024;  ///< bound of the partial-sum array

/// Blocks of the element-wise kernels for `elements` values: a function of
/// the count only (the norm's summation order must not depend on the device).
[[nodiscard]] inline int blocks_for(index_t elements) noexcept
{
  index_t const per_block = index_t{threads} * 16;
  return static_cast<int>(std::clamp<index_t>((elements + per_block - 1) / per_block, 1, max_blocks));
}

/// What `report` reads back to know the shapes of the last call.
struct header {
  index_t heads, tokens, cb_heads;
  int stages, max_iter;
  std::uint32_t magic;
};
inline constexpr std::uint32_t header_magic = 0x52515452u;  // "RQTR"

/// `acc` summed over the block by a fixed tree; the result is thread 0's.
__device__ __forceinline__ double block_sum(double acc)
{
  __shared__ double sums[threads];
  sums[threadIdx.x] = acc;
  __syncthreads();
  for (int w = threads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) { sums[threadIdx.x] += sums[threadIdx.x + w]; }
    __syncthreads();
  }
  return sums[0];
}

/// r[row, i] = float(keys(h, t, perm[i])) for row = h * tokens + t; partial
/// sums of r^2 per block. Block 0 also writes the header.
template <class Key>
__global__ void __launch_bounds__(threads)
  permute_kernel(Key const* keys, index_t s0, index_t s1, index_t s2, index_t tokens, int dim,
                 rq_gpu::channel_map const map, index_t elements, float* r, double* partial, header const hdr,
                 header* hdr_out)
{
  if (blockIdx.x == 0 && threadIdx.x == 0) { *hdr_out = hdr; }
  double acc = 0;
  index_t const stride = static_cast<index_t>(gridDim.x) * threads;
  for (index_t e = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x; e < elements; e += stride) {
    index_t const row = e / dim, h = row / tokens, t = row % tokens;
    int const i = static_cast<int>(e % dim);
    float const v = to_float(keys[h * s0 + t * s1 + static_cast<index_t>(map.perm[i]) * s2]);
    r[e] = v;
    acc += static_cast<double>(v) * static_cast<double>(v);
  }
  double const total = block_sum(acc);
  if (threadIdx.x == 0) { partial[blockIdx.x] = total; }
}

/// One stage's update: r[row, s * dsub + i] -= C(hc, s, stage, code, i) with
/// code = codes[row, s] (the greedy code of the stage), rounded to float;
/// partial sums of the new r^2 per block. (The unused template parameter keeps
/// the kernel out of the strong symbols of every translation unit that
/// includes this header.)
template <int = 0>
__global__ void __launch_bounds__(threads)
  subtract_kernel(float* r, std::uint8_t const* codes, float const* centroids, index_t rows_per_cb_head, int dim,
                  int splits, int stages, int stage, int ksub, int dsub, index_t elements, double* partial)
{
  double acc = 0;
  index_t const stride = static_cast<index_t>(gridDim.x) * threads;
  for (index_t e = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x; e < elements; e += stride) {
    index_t const row = e / dim, hc = row / rows_per_cb_head;
    int const i = static_cast<int>(e % dim), s = i / dsub;
    int const code = codes[row * splits + s];
    float const c = centroids[(((hc * splits + s) * stages + stage) * ksub + code) * dsub + i % dsub];
    float const v = __fsub_rn(r[e], c);
    r[e] = v;
    acc += static_cast<double>(v) * static_cast<double>(v);
  }
  double const total = block_sum(acc);
  if (threadIdx.x == 0) { partial[blockIdx.x] = total; }
}

/// One block: out = (sum of partial[0..count) by a fixed tree) / rows.
template <int = 0>
__global__ void __launch_bounds__(threads) finish_mean_kernel(double const* partial, int count, index_t rows, double* out)
{
  double acc = 0;
  for (int b = static_cast<int>(threadIdx.x); b < count; b += threads) { acc += partial[b]; }
  double const total = block_sum(acc);
  if (threadIdx.x == 0) { *out = total / static_cast<double>(rows); }
}

}  // namespace pqkv::detail::rq_train
