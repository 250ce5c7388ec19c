// SPDX-License-Identifier: Apache-2.0
#pragma once
// The example's quality measures on the GPU: the error of the sparse output
// against the dense one per q head, and the share of exact attention a
// needle row gives its needle token. Both read the full outputs and
// keys where they already are, so nothing of gigabyte size crosses PCIe.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/views.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace sp {

using pqkv::index_t;

/// Per q head, sums over all rows of: sum_d |out - ref|, sum_d (out - ref)^2
/// and sum_d ref^2.
struct error_sums {
  double l1 = 0, diff2 = 0, ref2 = 0;
};

namespace kernels {

inline constexpr int error_threads = 256;

/// part[h][chunk] = the three sums over rows [chunk * rows, (chunk + 1) * rows)
/// of q head h, in double. a, ref: [heads, tokens, dv] float, row-major.
/// One block per (chunk, head), a fixed reduction order: the same bits every run.
__global__ void __launch_bounds__(error_threads)
    error_partials(float const* __restrict__ out, float const* __restrict__ ref, index_t tokens, int dv, index_t rows,
                   error_sums* __restrict__ part)
{
  __shared__ double red[3][error_threads];
  index_t const h = blockIdx.y, chunk = blockIdx.x;
  index_t const t0 = chunk * rows, t1 = t0 + rows < tokens ? t0 + rows : tokens;
  index_t const base = h * tokens * dv;
  double l1 = 0, d2 = 0, r2 = 0;
  for (index_t i = t0 * dv + threadIdx.x; i < t1 * dv; i += error_threads) {
    double const a = out[base + i], b = ref[base + i];
    l1 += fabs(a - b);
    d2 += (a - b) * (a - b);
    r2 += b * b;
  }
  red[0][threadIdx.x] = l1;
  red[1][threadIdx.x] = d2;
  red[2][threadIdx.x] = r2;
  __syncthreads();
  for (int o = error_threads / 2; o > 0; o >>= 1) {
    if (static_cast<int>(threadIdx.x) < o) {
      for (int s = 0; s < 3; ++s) { red[s][threadIdx.x] += red[s][threadIdx.x + o]; }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) { part[h * gridDim.x + chunk] = {red[0][0], red[1][0], red[2][0]}; }
}

/// One needle per thread block: row `row` of q head `head`, needle key `pos`.
struct needle_probe {
  std::int32_t head, row, pos;
};

inline constexpr int probe_threads = 256, probe_warps = probe_threads / 32, probe_dim = 128;

/// share[e] = the exact causal softmax weight row `row` of q head `head` puts
/// on key `pos` (float logits, online softmax over keys 0..row). A warp takes
/// one key at a time, four channels per lane, so K rows are read coalesced;
/// the warps' partial (max, sum, needle term) merge at the end.
__global__ void __launch_bounds__(probe_threads)
    needle_share(__nv_bfloat16 const* __restrict__ q, __nv_bfloat16 const* __restrict__ k, index_t tokens,
                 int q_per_kv, float scale, needle_probe const* __restrict__ probes,
                 float* __restrict__ share)
{
  __shared__ float part[3][probe_warps];
  needle_probe const p = probes[blockIdx.x];
  int const warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  index_t const g = p.head / q_per_kv;
  __nv_bfloat16 const* const qr = q + (static_cast<index_t>(p.head) * tokens + p.row) * probe_dim + lane * 4;
  float qv[4];
  for (int c = 0; c < 4; ++c) { qv[c] = __bfloat162float(qr[c]); }
  float m = -INFINITY, z = 0.f, zn = 0.f;  // running max, sum and needle term, the same in every lane
  for (int j = warp; j <= p.row; j += probe_warps) {
    __nv_bfloat16 const* const kr = k + (g * tokens + j) * probe_dim + lane * 4;
    float dot = 0.f;
    for (int c = 0; c < 4; ++c) { dot = fmaf(qv[c], __bfloat162float(kr[c]), dot); }
    for (int o = 16; o > 0; o >>= 1) { dot += __shfl_xor_sync(0xffffffffu, dot, o); }
    float const s = dot * scale;
    float const mn = fmaxf(m, s);
    float const rescale = expf(m - mn), e = expf(s - mn);
    z = z * rescale + e;
    zn = zn * rescale + (j == p.pos ? e : 0.f);
    m = mn;
  }
  if (lane == 0) {
    part[0][warp] = m;
    part[1][warp] = z;
    part[2][warp] = zn;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int w = 0; w < probe_warps; ++w) { mx = fmaxf(mx, part[0][w]); }
    float zs = 0.f, ns = 0.f;
    for (int w = 0; w < probe_warps; ++w) {
      if (part[0][w] == -INFINITY) { continue; }  // a warp that saw no key
      float const f = expf(part[0][w] - mx);
      zs += part[1][w] * f;
      ns += part[2][w] * f;
    }
    share[blockIdx.x] = zs > 0.f ? ns / zs : 0.f;
  }
}

}  // namespace kernels

/// Per q head: the error sums of out against ref, both [heads, tokens, dv]
/// float on the device. Synchronizes `stream`.
inline std::vector<error_sums> output_errors(float const* out, float const* ref, index_t heads, index_t tokens,
                                             index_t dv, cudaStream_t stream)
{
  index_t const rows = 64, chunks = (tokens + rows - 1) / rows;
  pqkv::device_buffer<error_sums> part(static_cast<std::size_t>(heads * chunks));
  kernels::error_partials<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(heads)), kernels::error_threads,
                            0, stream>>>(out, ref, tokens, static_cast<int>(dv), rows, part.data());
  PQKV_CUDA_CHECK_LAST();
  std::vector<error_sums> host(part.size());
  PQKV_CUDA_TRY(cudaMemcpyAsync(host.data(), part.data(), part.size_bytes(), cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  std::vector<error_sums> sums(static_cast<std::size_t>(heads));
  for (index_t h = 0; h < heads; ++h) {
    for (index_t c = 0; c < chunks; ++c) {  // ascending: a fixed order
      auto const& e = host[static_cast<std::size_t>(h * chunks + c)];
      auto& s = sums[static_cast<std::size_t>(h)];
      s.l1 += e.l1;
      s.diff2 += e.diff2;
      s.ref2 += e.ref2;
    }
  }
  return sums;
}

/// The exact attention share of each probe's needle token (see `needle_share`);
/// q [q_heads, tokens, 128], k [kv_heads, tokens, 128] bf16 on the device.
/// Synchronizes `stream`.
inline std::vector<float> needle_shares(__nv_bfloat16 const* q, __nv_bfloat16 const* k, index_t tokens, int q_per_kv,
                                        float scale, std::vector<kernels::needle_probe> const& probes,
                                        cudaStream_t stream)
{
  std::vector<float> shares(probes.size());
  if (probes.empty()) { return shares; }
  pqkv::device_buffer<kernels::needle_probe> dprobes(probes.size());
  pqkv::device_buffer<float> dshare(probes.size());
  PQKV_CUDA_TRY(cudaMemcpyAsync(dprobes.data(), probes.data(), dprobes.size_bytes(), cudaMemcpyHostToDevice, stream));
  kernels::needle_share<<<static_cast<unsigned>(probes.size()), kernels::probe_threads, 0, stream>>>(
      q, k, tokens, q_per_kv, scale, dprobes.data(), dshare.data());
  PQKV_CUDA_CHECK_LAST();
  PQKV_CUDA_TRY(cudaMemcpyAsync(shares.data(), dshare.data(), dshare.size_bytes(), cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  return shares;
}

}  // namespace sp
