// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of the GPU residual encoder (encode/residual.cuh) and of the
/// GPU code attention (attend/code_attention.cuh). Users never name this header.
///
/// Greedy encoder: a block of 256 threads keeps 128 rows' residuals of one
/// (head, split) in shared memory, channel-major, and walks the stages; each
/// stage's codebook streams through shared memory in chunks of `kc`
/// codewords and the tile engine of the PQ encoder (nearest_gpu::tile_argmin,
/// the exact `fma(x - c, x - c, acc)` chain in channel order) gives each
/// chunk's lowest-index minimum; chunks are merged with a strict `<`, so the
/// result is the lowest index among the stage's minima, as the CPU scan.
/// The residual is then updated by `__fsub_rn`, as the CPU's `r - c`.
///
/// Greedy rows (few tokens, e.g. a decode step): a cluster of 8 blocks per
/// (head, token, split), block b scoring the codeword slice [b ksub / 8,
/// (b + 1) ksub / 8) one codeword per thread (the same chain); each stage's
/// winner is the minimum over the cluster's slots read in rank order, lower
/// index on ties, so the codes are the same.
///
/// Beam encoder: one warp per (head, token, split); each lane scores the
/// codewords c = lane (mod 32) against every kept tuple, keeps its own
/// `beam` best candidates in an unrolled sorted list, and the warp pops the
/// global best `beam` times by a butterfly minimum under the CPU's order
/// (distance, lexicographic rank of the parent tuple, codeword).
///
/// Code attention: four launches. `lut_kernel` (q . codeword, the CPU's fma
/// chain, bit for bit) -> `scan_kernel` (per KV head and token chunk: logits
/// from the LUT, online softmax in tiles, shared-memory histogram of the
/// probabilities per value codeword) -> `value_kernel` (the chunks'
/// histograms merged by their maxima, times the value codewords) ->
/// `finalize_kernel` (divide by the sum, un-permute, lse).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/channel_map.cuh>
#include <pqkv/detail/encode_gpu_kernels.cuh>

#include <cooperative_groups.h>
#include <cuda/std/limits>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pqkv::detail::rq_gpu {

/// Largest beam.
inline constexpr int max_beam = 16;

// ---- greedy encoder ------------------------------------------------------------------------

inline constexpr int threads = nearest_gpu::threads;
inline constexpr int tm = nearest_gpu::tm;
inline constexpr int bm = nearest_gpu::bm;
inline constexpr int xs_stride = nearest_gpu::xs_stride;

/// Codewords per thread and tile column of the greedy kernel.
[[nodiscard]] constexpr int tn_for(int ksub) noexcept { return ksub >= 64 ? 4 : ksub >= 32 ? 2 : 1; }
/// Codewords per shared-memory chunk: ksub padded to whole tiles, at most what
/// keeps two blocks per SM (dsub = 128: 64 codewords).
[[nodiscard]] constexpr int chunk_for(int dsub, int ksub) noexcept
{
  int const bn = 16 * tn_for(ksub);
  int const kpad = (ksub + bn - 1) / bn * bn;
  int const cap = dsub >= 128 ? 64 : (16384 / dsub < 1024 ? 16384 / dsub : 1024);
  return kpad < cap ? kpad : cap;
}
/// Dynamic shared memory of the greedy kernel.
[[nodiscard]] constexpr std::size_t greedy_smem_bytes(int dsub, int ksub) noexcept
{
  return (static_cast<std::size_t>(dsub) * chunk_for(dsub, ksub) + static_cast<std::size_t>(dsub) * xs_stride) *
         sizeof(float);
}

/// Encoder launch parameters (greedy and beam), validated on the host.
template <class Key>
struct encode_args {
  Key const* keys;  // [heads, tokens, dim], strides s0, s1, s2
  index_t s0, s1, s2;
  float const* centroids;  // [1|heads, splits, stages, ksub, dsub]
  void* codes;             // [heads, capacity, splits * stages], uint8 or uint16
  int code_bytes;          // 1 or 2
  index_t heads, tokens, capacity;
  index_t position;             // first code row written, when position_dev is null
  index_t const* position_dev;  // device: the first code row written
  int splits, stages, ksub, dsub, beam;
  bool shared;             // centroids.extent(0) == 1
  index_t rows_per_block;  // greedy: a multiple of bm
  channel_map map;
};

template <class Key>
__device__ __forceinline__ index_t read_position(encode_args<Key> const& a)
{
  return a.position_dev != nullptr ? *a.position_dev : a.position;
}

__device__ __forceinline__ void store_code(void* codes, int code_bytes, index_t at, int c)
{
  if (code_bytes == 1) {
    static_cast<std::uint8_t*>(codes)[at] = static_cast<std::uint8_t>(c);
  } else {
    static_cast<std::uint16_t*>(codes)[at] = static_cast<std::uint16_t>(c);
  }
}

/// grid (heads * splits, blocks per problem). A device position outside
/// [0, capacity - tokens] writes nothing.
template <class Key, int Dsub, int Tn>
__global__ void __launch_bounds__(threads, 2) greedy_kernel(encode_args<Key> const a)
{
  extern __shared__ __align__(16) float smem[];
  int const kc = chunk_for(Dsub, a.ksub);
  float* const cs = smem;                                       // [Dsub][kc]
  float* const xs = smem + static_cast<std::size_t>(Dsub) * kc;  // [Dsub][xs_stride]
  int const p = blockIdx.x, h = p / a.splits, s = p % a.splits;
  int const tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  index_t const position = read_position(a);
  if (position < 0 || position > a.capacity - a.tokens) { return; }
  index_t const r0 = static_cast<index_t>(blockIdx.y) * a.rows_per_block;
  index_t const r1 = r0 + a.rows_per_block < a.tokens ? r0 + a.rows_per_block : a.tokens;
  if (r0 >= r1) { return; }

  int const ncodes = a.splits * a.stages;
  float const* const cb = a.centroids + static_cast<std::size_t>((a.shared ? 0 : h) * a.splits + s) * a.stages *
                                          a.ksub * Dsub;  // [stages, ksub, Dsub]
  Key const* const base = a.keys + h * a.s0;
  index_t const out0 = (static_cast<index_t>(h) * a.capacity + position) * ncodes + s * a.stages;
  constexpr int vec = Dsub >= 8 ? 8 : 4;  // channels per thread when a chunk is staged

  for (index_t t0 = r0; t0 < r1; t0 += bm) {
    __syncthreads();  // the previous tile's readers are done
    for (int e = tid; e < bm * Dsub; e += threads) {
      int const r = e / Dsub, ch = e % Dsub;
      index_t const t = t0 + r;
      xs[ch * xs_stride + r] = t < r1 ? to_float(base[t * a.s1 + index_t{a.map.perm[s * Dsub + ch]} * a.s2]) : 0.f;
    }
    for (int st = 0; st < a.stages; ++st) {
      float const* const c_st = cb + static_cast<std::size_t>(st) * a.ksub * Dsub;
      float best[tm];
      int bidx[tm];
#pragma unroll
      for (int i = 0; i < tm; ++i) {
        best[i] = ::cuda::std::numeric_limits<float>::infinity();
        bidx[i] = 0;
      }
      for (int k0 = 0; k0 < a.ksub; k0 += kc) {
        __syncthreads();  // cs readers of the last chunk are done; xs is written
        // Consecutive threads take consecutive codewords, so the channel-major
        // stores hit distinct banks; each reads a whole 32-byte sector.
        for (int e = tid; e < kc * (Dsub / vec); e += threads) {
          int const k = e % kc, v = e / kc;
          float f[vec];
          if (k0 + k < a.ksub) {
            float4 const* src = reinterpret_cast<float4 const*>(c_st + static_cast<std::size_t>(k0 + k) * Dsub + v * vec);
#pragma unroll
            for (int q = 0; q < vec / 4; ++q) {
              float4 const w = src[q];
              f[4 * q] = w.x;
              f[4 * q + 1] = w.y;
              f[4 * q + 2] = w.z;
              f[4 * q + 3] = w.w;
            }
          } else {
#pragma unroll
            for (int q = 0; q < vec; ++q) { f[q] = 0.f; }
          }
#pragma unroll
          for (int q = 0; q < vec; ++q) { cs[(v * vec + q) * kc + k] = f[q]; }
        }
        __syncthreads();
        float cbest[tm];
        int cidx[tm];
        int const valid = a.ksub - k0 < kc ? a.ksub - k0 : kc;
        nearest_gpu::tile_argmin<Dsub, Tn, nearest_gpu::form::exact>(cs, nullptr, kc, valid, xs, ty, tx, cbest, cidx);
#pragma unroll
        for (int i = 0; i < tm; ++i) {
          if (cbest[i] < best[i]) {  // strict: an earlier chunk keeps a tie
            best[i] = cbest[i];
            bidx[i] = k0 + cidx[i];
          }
        }
      }
      __syncthreads();  // every xs read of this stage is done
      // The 16 lanes of a row group share its 8 rows' codes; each updates
      // channels tx, tx + 16, ... of those rows.
#pragma unroll
      for (int i = 0; i < tm; ++i) {
        float const* const cw = c_st + static_cast<std::size_t>(bidx[i]) * Dsub;
        for (int ch = tx; ch < Dsub; ch += 16) {
          float* x = &xs[ch * xs_stride + ty * tm + i];
          *x = __fsub_rn(*x, cw[ch]);
        }
        index_t const t = t0 + ty * tm + i;
        if (tx == 0 && t < r1) { store_code(a.codes, a.code_bytes, out0 + t * ncodes + st, bidx[i]); }
      }
    }
  }
}

/// Calls f.template operator()<Dsub, Tn>() for the runtime pair.
template <class F>
void dispatch(int dsub, int ksub, F&& f)
{
  nearest_gpu::dispatch_dsub(dsub, [&]<int D>() {
    switch (tn_for(ksub)) {
      case 4: f.template operator()<D, 4>(); break;
      case 2: f.template operator()<D, 2>(); break;
      default: f.template operator()<D, 1>(); break;
    }
  });
}

template <class Key>
void prepare_greedy(int dsub, int ksub)
{
  dispatch(dsub, ksub, [&]<int D, int Tn>() {
    PQKV_CUDA_TRY(cudaFuncSetAttribute(greedy_kernel<Key, D, Tn>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(greedy_smem_bytes(D, ksub))));
  });
}

template <class Key>
int greedy_occupancy(int dsub, int ksub)
{
  int occ = 1;
  dispatch(dsub, ksub, [&]<int D, int Tn>() {
    PQKV_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, greedy_kernel<Key, D, Tn>, threads,
                                                                greedy_smem_bytes(D, ksub)));
  });
  return occ > 0 ? occ : 1;
}

/// Sets the kernel's shared-memory limit at each launch (a host-side call,
/// allowed during stream capture), so only the key types actually encoded are
/// compiled.
template <class Key>
void launch_greedy(encode_args<Key> const& a, int grid_y, cudaStream_t stream)
{
  dispatch(a.dsub, a.ksub, [&]<int D, int Tn>() {
    PQKV_CUDA_TRY(cudaFuncSetAttribute(greedy_kernel<Key, D, Tn>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(greedy_smem_bytes(D, a.ksub))));
    greedy_kernel<Key, D, Tn><<<dim3(static_cast<unsigned>(a.heads * a.splits), static_cast<unsigned>(grid_y)),
                                threads, greedy_smem_bytes(D, a.ksub), stream>>>(a);
    PQKV_CUDA_CHECK_LAST();
  });
}

// ---- greedy rows ---------------------------------------------------------------------------

inline constexpr int row_cluster = 8;  ///< blocks per row (the portable cluster size)
inline constexpr int row_threads = 256;

/// grid (heads * tokens * splits * row_cluster), clusters of row_cluster blocks.
template <class Key>
__global__ void __cluster_dims__(row_cluster, 1, 1) __launch_bounds__(row_threads)
  greedy_row_kernel(encode_args<Key> const a)
{
  namespace cg = cooperative_groups;
  __shared__ float r[128];
  __shared__ float wd[row_threads / 32];
  __shared__ int wc[row_threads / 32];
  __shared__ float slot_d[2];
  __shared__ int slot_c[2];
  __shared__ int sbest;
  cg::cluster_group cluster = cg::this_cluster();
  int const rank = static_cast<int>(cluster.block_rank());
  index_t const position = read_position(a);
  if (position < 0 || position > a.capacity - a.tokens) { return; }  // the same in every block of the cluster
  index_t const item = blockIdx.x / row_cluster;  // (h, t, s), s fastest
  int const s = static_cast<int>(item % a.splits);
  index_t const t = item / a.splits % a.tokens;
  int const h = static_cast<int>(item / a.splits / a.tokens);
  int const tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int const dsub = a.dsub, ksub = a.ksub, stages = a.stages;
  int const lo = rank * ksub / row_cluster, hi = (rank + 1) * ksub / row_cluster;
  constexpr int none = 0x7fffffff;
  for (int i = tid; i < dsub; i += row_threads) {
    r[i] = to_float(a.keys[h * a.s0 + t * a.s1 + index_t{a.map.perm[s * dsub + i]} * a.s2]);
  }
  __syncthreads();
  float const* const cb =
    a.centroids + static_cast<std::size_t>((a.shared ? 0 : h) * a.splits + s) * stages * ksub * dsub;
  index_t const out0 = (static_cast<index_t>(h) * a.capacity + position + t) * (a.splits * stages) + s * stages;
  for (int st = 0; st < stages; ++st) {
    float const* const c_st = cb + static_cast<std::size_t>(st) * ksub * dsub;
    float bd = ::cuda::std::numeric_limits<float>::infinity();
    int bc = none;
    for (int c = lo + tid; c < hi; c += row_threads) {
      float4 const* cw = reinterpret_cast<float4 const*>(c_st + static_cast<std::size_t>(c) * dsub);
      float d = 0.f;
      for (int i4 = 0; i4 < dsub / 4; ++i4) {
        float4 const w = cw[i4];
        float diff = __fsub_rn(r[4 * i4], w.x);
        d = fmaf(diff, diff, d);
        diff = __fsub_rn(r[4 * i4 + 1], w.y);
        d = fmaf(diff, diff, d);
        diff = __fsub_rn(r[4 * i4 + 2], w.z);
        d = fmaf(diff, diff, d);
        diff = __fsub_rn(r[4 * i4 + 3], w.w);
        d = fmaf(diff, diff, d);
      }
      if (d < bd) {  // strict, codewords ascending: the lowest index of this thread's minima
        bd = d;
        bc = c;
      }
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) {
      float const od = __shfl_xor_sync(0xffffffffu, bd, off);
      int const oc = __shfl_xor_sync(0xffffffffu, bc, off);
      if (od < bd || (od == bd && oc < bc)) {
        bd = od;
        bc = oc;
      }
    }
    if (lane == 0) {
      wd[warp] = bd;
      wc[warp] = bc;
    }
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < row_threads / 32; ++w) {
        if (wd[w] < bd || (wd[w] == bd && wc[w] < bc)) {
          bd = wd[w];
          bc = wc[w];
        }
      }
      slot_d[st & 1] = bd;
      slot_c[st & 1] = bc;
    }
    cluster.sync();  // every block's slot of this stage is written
    if (tid == 0) {
      float d = ::cuda::std::numeric_limits<float>::infinity();
      int c = none;
      for (int src = 0; src < row_cluster; ++src) {
        float const od = *cluster.map_shared_rank(&slot_d[st & 1], src);
        int const oc = *cluster.map_shared_rank(&slot_c[st & 1], src);
        if (od < d || (od == d && oc < c)) {
          d = od;
          c = oc;
        }
      }
      sbest = c == none ? 0 : c;  // no finite distance anywhere: codeword 0, as the CPU's scan
    }
    __syncthreads();
    int const best = sbest;
    for (int i = tid; i < dsub; i += row_threads) { r[i] = __fsub_rn(r[i], c_st[static_cast<std::size_t>(best) * dsub + i]); }
    if (rank == 0 && tid == 0) { store_code(a.codes, a.code_bytes, out0 + st, best); }
    __syncthreads();  // r and the warp slots are reused by the next stage
  }
  cluster.sync();  // no block leaves while another may still read its slots
}

template <class Key>
void launch_greedy_rows(encode_args<Key> const& a, cudaStream_t stream)
{
  index_t const blocks = a.heads * a.tokens * a.splits * row_cluster;
  greedy_row_kernel<Key><<<static_cast<unsigned>(blocks), row_threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

// ---- beam encoder --------------------------------------------------------------------------

inline constexpr int beam_warps = 4;

/// One candidate of the beam: distance, lexicographic rank of the parent
/// tuple, parent slot, codeword. (d, rp, c) orders candidates as the CPU.
struct cand {
  float d;
  int rp, p, c;
};

__device__ __forceinline__ bool cand_less(cand const& a, cand const& b)
{
  if (a.d != b.d) { return a.d < b.d; }
  if (a.rp != b.rp) { return a.rp < b.rp; }
  return a.c < b.c;
}

/// Shared memory of one warp: r, rn [beam][dsub] float; code, coden
/// [beam][stages] int32; rank, sel_p, sel_c [beam] int32.
[[nodiscard]] constexpr std::size_t beam_warp_bytes(int beam, int dsub, int stages) noexcept
{
  return (2 * static_cast<std::size_t>(beam) * dsub + 2 * static_cast<std::size_t>(beam) * stages + 3 * beam) * 4;
}

/// grid (ceil(heads * tokens * splits / beam_warps)), beam_warps warps.
template <class Key>
__global__ void __launch_bounds__(beam_warps * 32) beam_kernel(encode_args<Key> const a)
{
  extern __shared__ __align__(16) float smem[];
  int const warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  index_t const item = static_cast<index_t>(blockIdx.x) * beam_warps + warp;  // (h, t, s), s fastest
  if (item >= a.heads * a.tokens * a.splits) { return; }
  index_t const position = read_position(a);
  if (position < 0 || position > a.capacity - a.tokens) { return; }
  int const s = static_cast<int>(item % a.splits);
  index_t const t = item / a.splits % a.tokens;
  int const h = static_cast<int>(item / a.splits / a.tokens);
  int const B = a.beam, dsub = a.dsub, stages = a.stages, ksub = a.ksub;

  std::size_t const words = beam_warp_bytes(B, dsub, stages) / 4;
  float* r = smem + warp * words;
  float* rn = r + B * dsub;
  int* code = reinterpret_cast<int*>(rn + B * dsub);
  int* coden = code + B * stages;
  int* const rank = coden + B * stages;
  int* const sel_p = rank + B;
  int* const sel_c = sel_p + B;

  for (int i = lane; i < dsub; i += 32) {
    r[i] = to_float(a.keys[h * a.s0 + t * a.s1 + index_t{a.map.perm[s * dsub + i]} * a.s2]);
  }
  for (int j = lane; j < stages; j += 32) { code[j] = 0; }
  __syncwarp();
  float const* const cb =
    a.centroids + static_cast<std::size_t>((a.shared ? 0 : h) * a.splits + s) * stages * ksub * dsub;
  int kept = 1;
  for (int st = 0; st < stages; ++st) {
    float const* const c_st = cb + static_cast<std::size_t>(st) * ksub * dsub;
    if (lane < kept) {
      int rk = 0;
      for (int q = 0; q < kept; ++q) {
        for (int j = 0; j < st; ++j) {
          int const cq = code[q * stages + j], cp = code[lane * stages + j];
          if (cq != cp) {
            rk += cq < cp ? 1 : 0;
            break;
          }
        }
      }
      rank[lane] = rk;
    }
    __syncwarp();
    int const width = B < kept * ksub ? B : kept * ksub;
    cand list[max_beam];
    int n = 0;
    for (int p = 0; p < kept; ++p) {
      int const rp = rank[p];
      float const* const rv = r + p * dsub;
      for (int c = lane; c < ksub; c += 32) {
        float4 const* cw = reinterpret_cast<float4 const*>(c_st + static_cast<std::size_t>(c) * dsub);
        float d = 0.f;
        for (int i4 = 0; i4 < dsub / 4; ++i4) {
          float4 const w = cw[i4];
          float diff = __fsub_rn(rv[4 * i4], w.x);
          d = fmaf(diff, diff, d);
          diff = __fsub_rn(rv[4 * i4 + 1], w.y);
          d = fmaf(diff, diff, d);
          diff = __fsub_rn(rv[4 * i4 + 2], w.z);
          d = fmaf(diff, diff, d);
          diff = __fsub_rn(rv[4 * i4 + 3], w.w);
          d = fmaf(diff, diff, d);
        }
        cand cur{d, rp, p, c};
#pragma unroll
        for (int j = 0; j < max_beam; ++j) {
          if (j < n) {
            if (cand_less(cur, list[j])) {
              cand const tmp = list[j];
              list[j] = cur;
              cur = tmp;
            }
          } else if (j == n && j < width) {
            list[j] = cur;
          }
        }
        n = n + 1 < width ? n + 1 : width;
      }
    }
    // Pop the warp's best `width` candidates in order.
    for (int k = 0; k < width; ++k) {
      cand best = n > 0 ? list[0] : cand{::cuda::std::numeric_limits<float>::infinity(), 0x7fffffff, 0, 0x7fffffff};
      int src = n > 0 ? lane : 32;
#pragma unroll
      for (int off = 16; off >= 1; off /= 2) {
        cand o;
        o.d = __shfl_xor_sync(0xffffffffu, best.d, off);
        o.rp = __shfl_xor_sync(0xffffffffu, best.rp, off);
        o.p = __shfl_xor_sync(0xffffffffu, best.p, off);
        o.c = __shfl_xor_sync(0xffffffffu, best.c, off);
        int const osrc = __shfl_xor_sync(0xffffffffu, src, off);
        if (cand_less(o, best) || (!cand_less(best, o) && osrc < src)) {
          best = o;
          src = osrc;
        }
      }
      if (lane == src) {
#pragma unroll
        for (int j = 0; j + 1 < max_beam; ++j) { list[j] = list[j + 1]; }
        --n;
      }
      if (lane == 0) {
        sel_p[k] = best.p;
        sel_c[k] = best.c;
      }
    }
    __syncwarp();
    for (int e = lane; e < width * dsub; e += 32) {
      int const k = e / dsub, i = e % dsub;
      rn[e] = __fsub_rn(r[sel_p[k] * dsub + i], c_st[static_cast<std::size_t>(sel_c[k]) * dsub + i]);
    }
    for (int e = lane; e < width * stages; e += 32) {
      int const k = e / stages, j = e % stages;
      coden[e] = j == st ? sel_c[k] : code[sel_p[k] * stages + j];
    }
    __syncwarp();
    float* const tr = r;
    r = rn;
    rn = tr;
    int* const tc = code;
    code = coden;
    coden = tc;
    kept = width;
  }
  index_t const out0 = (static_cast<index_t>(h) * a.capacity + position + t) * (a.splits * stages) + s * stages;
  for (int j = lane; j < stages; j += 32) { store_code(a.codes, a.code_bytes, out0 + j, code[j]); }
}

/// Sets the kernel's shared-memory limit at each launch (see launch_greedy).
template <class Key>
void launch_beam(encode_args<Key> const& a, cudaStream_t stream)
{
  index_t const items = a.heads * a.tokens * a.splits;
  index_t const blocks = (items + beam_warps - 1) / beam_warps;
  PQKV_CUDA_TRY(cudaFuncSetAttribute(beam_kernel<Key>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(beam_warps * beam_warp_bytes(a.beam, a.dsub, a.stages))));
  beam_kernel<Key><<<static_cast<unsigned>(blocks), beam_warps * 32,
                     beam_warps * beam_warp_bytes(a.beam, a.dsub, a.stages), stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

// ---- code attention ------------------------------------------------------------------------

inline constexpr int max_group = 8;      ///< q heads per KV head
inline constexpr int attn_threads = 256;
inline constexpr int tokens_per_thread = 2;
inline constexpr int scan_tile = attn_threads * tokens_per_thread;  ///< tokens per softmax tile
inline constexpr int lut_codewords = 64;  ///< codewords per block of the LUT kernel
inline constexpr int value_slice_max = 1024;  ///< (stage, codeword) entries per block of the value kernel

/// Workspace sections of one call, in floats from a 256-byte-aligned start.
struct attn_layout {
  std::size_t lut = 0, ml = 0, hist = 0, part = 0, total_floats = 0;
};

/// Everything the four kernels need (validated on the host).
template <class KCode, class VCode>
struct attn_args {
  float const* q;  // [q_heads, dim], strides qs0, qs1
  index_t qs0, qs1;
  float const* kcent;  // [1|kv_heads, splits_k, stages_k, ksub_k, dsub_k]
  float const* vcent;  // [1|kv_heads, splits_v, stages_v, ksub_v, dsub_v]
  KCode const* kcodes;  // [kv_heads, capacity, nk]
  VCode const* vcodes;  // [kv_heads, capacity, nv]
  float* out;           // [q_heads, dv], row-major
  float* lse;           // [q_heads] or null
  float* lut;           // [kv_heads, nk, ksub_k, group]
  float* ml;            // [kv_heads, chunks, group, 2]: chunk max, chunk sum
  float* hist;          // [kv_heads, chunks, group, nv, ksub_v]
  float* part;          // [slices, q_heads, dv]: partial outputs
  index_t capacity, length, chunk_tokens;
  index_t const* length_dev;
  int q_heads, kv_heads, group, chunks;
  int dim, splits_k, stages_k, ksub_k, dsub_k, nk;
  int dv, splits_v, stages_v, ksub_v, dsub_v, nv;
  int kshared, vshared;  // centroids.extent(0) == 1
  int slices, slice;     // value kernel: slices per split, entries per slice
  float scale;
  int lut_in_smem;
  channel_map kmap, vmap;
};

template <class KCode, class VCode>
__device__ __forceinline__ index_t read_length(attn_args<KCode, VCode> const& a)
{
  index_t n = a.length_dev != nullptr ? *a.length_dev : a.length;
  return n < 0 ? 0 : n > a.capacity ? a.capacity : n;
}

/// grid (ceil(ksub_k / 64), nk, key codebook heads). Each block: 64
/// codewords of one (head, split, stage) against every q head that uses that
/// codebook; lut = fma chain over the split's channels, ascending.
template <class KCode, class VCode>
__global__ void __launch_bounds__(attn_threads) lut_kernel(attn_args<KCode, VCode> const a)
{
  extern __shared__ __align__(16) float smem[];
  int const dsub = a.dsub_k, ld = dsub + 1;
  int const n = blockIdx.y, s = n / a.stages_k, st = n % a.stages_k, hc = blockIdx.z;
  int const c0 = blockIdx.x * lut_codewords;
  int const qn = a.kshared ? a.q_heads : a.group;  // q heads served by codebook head hc
  int const h0 = a.kshared ? 0 : hc * a.group;
  float* const cs = smem;                     // [64][dsub + 1]
  float* const qs = smem + lut_codewords * ld;  // [qn][dsub + 1]
  float const* const cw =
    a.kcent + ((static_cast<std::size_t>(hc) * a.splits_k + s) * a.stages_k + st) * a.ksub_k * dsub;
  for (int e = threadIdx.x; e < lut_codewords * dsub; e += attn_threads) {
    int const c = e / dsub, i = e % dsub;
    cs[c * ld + i] = c0 + c < a.ksub_k ? cw[static_cast<std::size_t>(c0 + c) * dsub + i] : 0.f;
  }
  for (int e = threadIdx.x; e < qn * dsub; e += attn_threads) {
    int const q = e / dsub, i = e % dsub;
    qs[q * ld + i] = a.q[(h0 + q) * a.qs0 + index_t{a.kmap.perm[s * dsub + i]} * a.qs1];
  }
  __syncthreads();
  int const c = threadIdx.x % lut_codewords, lanes = attn_threads / lut_codewords;
  if (c0 + c >= a.ksub_k) { return; }
  for (int q = threadIdx.x / lut_codewords; q < qn; q += lanes) {
    float acc = 0.f;
    for (int i = 0; i < dsub; ++i) { acc = fmaf(qs[q * ld + i], cs[c * ld + i], acc); }
    int const h = h0 + q, g = h / a.group, qq = h % a.group;
    a.lut[((static_cast<std::size_t>(g) * a.nk + n) * a.ksub_k + c0 + c) * a.group + qq] = acc;
  }
}

template <int Width>
__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
  for (int off = Width / 2; off >= 1; off /= 2) { v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off)); }
  return v;
}

template <int Width>
__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
  for (int off = Width / 2; off >= 1; off /= 2) { v += __shfl_xor_sync(0xffffffffu, v, off); }
  return v;
}

/// The scan's integer histogram: each token's value weight p = exp(logit - m)
/// <= 1 is rounded to a multiple of 2^-22 and added as an integer (a native
/// shared-memory atomic, where a float add is a compare-and-swap loop), so a
/// tile of 512 tokens adds at most 2^31 to an entry. After each tile every
/// thread folds its entries into float registers (rescaled with the running
/// maximum) and clears them.
inline constexpr float int_hist_scale = 4194304.f;  // 2^22
inline constexpr int int_hist_per_thread = 32;     ///< register entries per thread
/// Whether a histogram of `entries` floats (group x nv x ksub_v) takes the integer path.
[[nodiscard]] constexpr bool int_hist_fits(std::size_t entries) noexcept
{
  return entries <= static_cast<std::size_t>(int_hist_per_thread) * attn_threads;
}

/// Dynamic shared memory of the scan kernel: hist [group][nv][ksub_v], then
/// (when it lives there) the group's LUT [nk][ksub_k][group].
[[nodiscard]] inline std::size_t scan_smem_bytes(int group, int nv, int ksub_v, int nk, int ksub_k, bool lut) noexcept
{
  std::size_t const hist = static_cast<std::size_t>(group) * nv * ksub_v;
  return (hist + (lut ? static_cast<std::size_t>(nk) * ksub_k * group : 0)) * sizeof(float);
}

/// grid (chunks, kv_heads). Tokens [b * chunk, (b + 1) * chunk) of KV head g
/// below the length: the chunk's max m and sum l of exp(logit - m) per q head
/// of the group, and its histogram of exp(logit - m) per value codeword.
/// IntHist: the integer histogram above (`int_hist_fits`); else float atomics.
template <class KCode, class VCode, bool IntHist>
__global__ void __launch_bounds__(attn_threads) scan_kernel(attn_args<KCode, VCode> const a)
{
  extern __shared__ __align__(16) float smem[];
  __shared__ float red[attn_threads / 32][max_group];
  int const b = blockIdx.x, g = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int const group = a.group, nk = a.nk, nv = a.nv, ksub_k = a.ksub_k, ksub_v = a.ksub_v;
  index_t const length = read_length(a);
  index_t const t_begin = b * a.chunk_tokens;
  index_t const t_end = t_begin + a.chunk_tokens < length ? t_begin + a.chunk_tokens : length;
  float* const ml = a.ml + (static_cast<std::size_t>(g) * a.chunks + b) * group * 2;
  if (t_begin >= t_end) {
    if (tid < group) {
      ml[2 * tid] = -::cuda::std::numeric_limits<float>::infinity();
      ml[2 * tid + 1] = 0.f;
    }
    return;
  }
  int const hist_n = group * nv * ksub_v;
  float* const hist = smem;
  auto* const ihist = reinterpret_cast<unsigned*>(smem);  // the integer path's histogram (the same bytes)
  float facc[IntHist ? int_hist_per_thread : 1];         // entries tid + i * attn_threads, integer path
#pragma unroll
  for (int i = 0; i < (IntHist ? int_hist_per_thread : 1); ++i) { facc[i] = 0.f; }
  float const* lut = a.lut + static_cast<std::size_t>(g) * nk * ksub_k * group;
  if (a.lut_in_smem != 0) {
    float* const l = smem + hist_n;
    int const lut_n = nk * ksub_k * group;
    for (int e = tid; e < lut_n; e += attn_threads) { l[e] = lut[e]; }
    lut = l;
  }
  for (int e = tid; e < hist_n; e += attn_threads) { hist[e] = 0.f; }
  unsigned const kmask = static_cast<unsigned>(ksub_k - 1), vmask = static_cast<unsigned>(ksub_v - 1);
  KCode const* const kc = a.kcodes + static_cast<std::size_t>(g) * a.capacity * nk;
  VCode const* const vc = a.vcodes + static_cast<std::size_t>(g) * a.capacity * nv;
  float m[max_group], lsum[max_group];
#pragma unroll
  for (int q = 0; q < max_group; ++q) {
    m[q] = -::cuda::std::numeric_limits<float>::infinity();
    lsum[q] = 0.f;
  }
  __syncthreads();
  for (index_t t0 = t_begin; t0 < t_end; t0 += scan_tile) {
    float lg[tokens_per_thread][max_group];
    float tmax[max_group];
#pragma unroll
    for (int q = 0; q < max_group; ++q) { tmax[q] = -::cuda::std::numeric_limits<float>::infinity(); }
#pragma unroll
    for (int k = 0; k < tokens_per_thread; ++k) {
      index_t const t = t0 + k * attn_threads + tid;
      float acc[max_group];
#pragma unroll
      for (int q = 0; q < max_group; ++q) { acc[q] = 0.f; }
      if (t < t_end) {
        KCode const* const row = kc + t * nk;
        if (group % 4 == 0) {  // one 16-byte read per 4 q heads (the LUT is 16-byte aligned then)
          for (int n = 0; n < nk; ++n) {
            float4 const* const e = reinterpret_cast<float4 const*>(
              lut + (static_cast<std::size_t>(n) * ksub_k + (static_cast<unsigned>(row[n]) & kmask)) * group);
#pragma unroll
            for (int v = 0; v < max_group / 4; ++v) {
              if (4 * v < group) {
                float4 const w = e[v];
                acc[4 * v] = __fadd_rn(acc[4 * v], w.x);
                acc[4 * v + 1] = __fadd_rn(acc[4 * v + 1], w.y);
                acc[4 * v + 2] = __fadd_rn(acc[4 * v + 2], w.z);
                acc[4 * v + 3] = __fadd_rn(acc[4 * v + 3], w.w);
              }
            }
          }
        } else {
          for (int n = 0; n < nk; ++n) {
            float const* const e =
              lut + (static_cast<std::size_t>(n) * ksub_k + (static_cast<unsigned>(row[n]) & kmask)) * group;
#pragma unroll
            for (int q = 0; q < max_group; ++q) {
              if (q < group) { acc[q] = __fadd_rn(acc[q], e[q]); }
            }
          }
        }
      }
#pragma unroll
      for (int q = 0; q < max_group; ++q) {
        lg[k][q] = t < t_end ? __fmul_rn(a.scale, acc[q]) : -::cuda::std::numeric_limits<float>::infinity();
        tmax[q] = fmaxf(tmax[q], lg[k][q]);
      }
    }
#pragma unroll
    for (int q = 0; q < max_group; ++q) {
      float const w = warp_max<32>(tmax[q]);
      if (lane == 0) { red[warp][q] = w; }
    }
    __syncthreads();  // also: the previous tile's histogram adds are done
    float alpha[max_group];
    bool rescale = false;
#pragma unroll
    for (int q = 0; q < max_group; ++q) {
      float mt = red[0][q];
#pragma unroll
      for (int w = 1; w < attn_threads / 32; ++w) { mt = fmaxf(mt, red[w][q]); }
      float const mn = fmaxf(m[q], mt);
      alpha[q] = m[q] == -::cuda::std::numeric_limits<float>::infinity() ? 1.f : expf(m[q] - mn);
      rescale = rescale || (q < group && alpha[q] != 1.f);
      lsum[q] *= alpha[q];
      m[q] = mn;
    }
    __syncthreads();  // red is rewritten by the next tile
    if constexpr (IntHist) {
      // Fold the previous tile's integer adds (relative to the old maximum)
      // into the registers, rescale to the new maximum, clear the entries.
      int const per_q = nv * ksub_v;
#pragma unroll
      for (int i = 0; i < int_hist_per_thread; ++i) {
        int const e = tid + i * attn_threads;
        if (e < hist_n) {
          int const q = e / per_q;
          float al = 1.f;
#pragma unroll
          for (int qq = 0; qq < max_group; ++qq) {
            if (qq == q) { al = alpha[qq]; }
          }
          facc[i] = __fmul_rn(__fadd_rn(facc[i], __fmul_rn(static_cast<float>(ihist[e]), 1.f / int_hist_scale)), al);
          ihist[e] = 0u;
        }
      }
      __syncthreads();
    } else if (rescale) {  // the same decision in every thread
      for (int e = tid; e < hist_n; e += attn_threads) {
        int const q = e / (nv * ksub_v);
        float al = 1.f;
#pragma unroll
        for (int qq = 0; qq < max_group; ++qq) {
          if (qq == q) { al = alpha[qq]; }
        }
        hist[e] *= al;
      }
      __syncthreads();
    }
#pragma unroll
    for (int k = 0; k < tokens_per_thread; ++k) {
      index_t const t = t0 + k * attn_threads + tid;
      if (t >= t_end) { continue; }
      VCode const* const row = vc + t * nv;
      float pr[max_group];
#pragma unroll
      for (int q = 0; q < max_group; ++q) {
        pr[q] = q < group ? expf(lg[k][q] - m[q]) : 0.f;
        lsum[q] += pr[q];
      }
      for (int n = 0; n < nv; ++n) {
        float* const hrow = hist + static_cast<std::size_t>(n) * ksub_v + (static_cast<unsigned>(row[n]) & vmask);
#pragma unroll
        for (int q = 0; q < max_group; ++q) {
          if (q < group) {
            if constexpr (IntHist) {
              atomicAdd(reinterpret_cast<unsigned*>(hrow + static_cast<std::size_t>(q) * nv * ksub_v),
                        __float2uint_rn(pr[q] * int_hist_scale));
            } else {
              atomicAdd(hrow + static_cast<std::size_t>(q) * nv * ksub_v, pr[q]);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < max_group; ++q) {
    float const w = warp_sum<32>(lsum[q]);
    if (lane == 0) { red[warp][q] = w; }
  }
  __syncthreads();
  if (tid < group) {
    float l = 0.f;
    for (int w = 0; w < attn_threads / 32; ++w) { l += red[w][tid]; }
    float mq = 0.f;
#pragma unroll
    for (int q = 0; q < max_group; ++q) {
      if (q == tid) { mq = m[q]; }
    }
    ml[2 * tid] = mq;
    ml[2 * tid + 1] = l;
  }
  float* const out = a.hist + (static_cast<std::size_t>(g) * a.chunks + b) * hist_n;
  if constexpr (IntHist) {  // the last tile's adds are done (the barrier above)
#pragma unroll
    for (int i = 0; i < int_hist_per_thread; ++i) {
      int const e = tid + i * attn_threads;
      if (e < hist_n) { out[e] = __fadd_rn(facc[i], __fmul_rn(static_cast<float>(ihist[e]), 1.f / int_hist_scale)); }
    }
  } else {
    for (int e = tid; e < hist_n; e += attn_threads) { out[e] = hist[e]; }
  }
}

/// Dynamic shared memory of the value kernel: f [group][chunks], w [group][slice],
/// partial sums [256][group].
[[nodiscard]] inline std::size_t value_smem_bytes(int group, int chunks, int slice) noexcept
{
  return (static_cast<std::size_t>(group) * chunks + static_cast<std::size_t>(group) * slice +
          static_cast<std::size_t>(attn_threads) * group + max_group) *
         sizeof(float);
}

/// grid (slices, splits_v, kv_heads). Entries [j * slice, ...) of the
/// (stage, codeword) range of value split s: the weights merged over chunks
/// (hist * exp(m_b - M)), times the codewords, into part[j'] (j' = s * slices + j).
template <class KCode, class VCode>
__global__ void __launch_bounds__(attn_threads) value_kernel(attn_args<KCode, VCode> const a)
{
  extern __shared__ __align__(16) float smem[];
  int const j = blockIdx.x, s = blockIdx.y, g = blockIdx.z, tid = threadIdx.x;
  int const group = a.group, chunks = a.chunks, ksub_v = a.ksub_v, dsub_v = a.dsub_v;
  int const per_split = a.stages_v * ksub_v;
  int const k0 = j * a.slice, k1 = k0 + a.slice < per_split ? k0 + a.slice : per_split;
  int const len = k1 > k0 ? k1 - k0 : 0;
  float* const f = smem;                   // [group][chunks]
  float* const w = f + group * chunks;     // [group][slice]
  float* const red = w + group * a.slice;  // [256][group]
  float* const mx = red + attn_threads * group;  // [group]
  float const* const ml = a.ml + static_cast<std::size_t>(g) * chunks * group * 2;
  if (tid < group) {
    float mq = -::cuda::std::numeric_limits<float>::infinity();
    for (int b = 0; b < chunks; ++b) { mq = fmaxf(mq, ml[(b * group + tid) * 2]); }
    mx[tid] = mq;
  }
  __syncthreads();
  for (int e = tid; e < group * chunks; e += attn_threads) {
    int const q = e / chunks, b = e % chunks;
    float const mb = ml[(b * group + q) * 2];
    f[e] = mb == -::cuda::std::numeric_limits<float>::infinity() ? 0.f : expf(mb - mx[q]);
  }
  __syncthreads();
  std::size_t const hist_n = static_cast<std::size_t>(group) * a.nv * ksub_v;
  float const* const hist = a.hist + static_cast<std::size_t>(g) * chunks * hist_n;
  for (int e = tid; e < group * len; e += attn_threads) {
    int const q = e / len, k = e % len;
    float const* const hq = hist + (static_cast<std::size_t>(q) * a.nv + s * a.stages_v) * ksub_v + k0 + k;
    float acc = 0.f;
#pragma unroll 8
    for (int b = 0; b < chunks; ++b) {
      // Loaded whatever f is (so the loads pipeline); chunks past the length
      // never wrote their histogram, so their (any) bits are not used.
      float const fb = f[q * chunks + b], hv = hq[b * hist_n];
      acc = fb != 0.f ? fmaf(fb, hv, acc) : acc;
    }
    w[q * a.slice + k] = acc;
  }
  __syncthreads();
  int const parts = attn_threads / dsub_v, i = tid % dsub_v, part = tid / dsub_v;
  float acc[max_group];
#pragma unroll
  for (int q = 0; q < max_group; ++q) { acc[q] = 0.f; }
  if (part < parts) {
    float const* const cv = a.vcent + ((static_cast<std::size_t>(a.vshared ? 0 : g) * a.splits_v + s) * per_split +
                                       k0) * dsub_v + i;
#pragma unroll 8
    for (int k = part; k < len; k += parts) {
      float const c = cv[static_cast<std::size_t>(k) * dsub_v];
#pragma unroll
      for (int q = 0; q < max_group; ++q) {
        if (q < group) { acc[q] = fmaf(w[q * a.slice + k], c, acc[q]); }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < max_group; ++q) {
    if (q < group) { red[tid * group + q] = acc[q]; }
  }
  __syncthreads();
  for (int e = tid; e < group * dsub_v; e += attn_threads) {
    int const q = e / dsub_v, ii = e % dsub_v;
    float sum = 0.f;
    for (int p = 0; p < parts; ++p) { sum += red[(p * dsub_v + ii) * group + q]; }
    a.part[(static_cast<std::size_t>(s * a.slices + j) * a.q_heads + g * group + q) * a.dv + s * dsub_v + ii] = sum;
  }
}

/// grid (q_heads). out(h, vperm[d]) = sum of the slices' partials / L,
/// lse = M + log L; zeros and -inf when nothing was attended.
template <class KCode, class VCode>
__global__ void __launch_bounds__(attn_threads) finalize_kernel(attn_args<KCode, VCode> const a)
{
  __shared__ float shared_ml[2];
  int const h = blockIdx.x, g = h / a.group, q = h % a.group;
  float const* const ml = a.ml + static_cast<std::size_t>(g) * a.chunks * a.group * 2;
  if (threadIdx.x == 0) {
    float mq = -::cuda::std::numeric_limits<float>::infinity();
    for (int b = 0; b < a.chunks; ++b) { mq = fmaxf(mq, ml[(b * a.group + q) * 2]); }
    float l = 0.f;
    if (mq != -::cuda::std::numeric_limits<float>::infinity()) {
      for (int b = 0; b < a.chunks; ++b) {
        float const mb = ml[(b * a.group + q) * 2];
        if (mb != -::cuda::std::numeric_limits<float>::infinity()) { l = fmaf(ml[(b * a.group + q) * 2 + 1], expf(mb - mq), l); }
      }
    }
    shared_ml[0] = mq;
    shared_ml[1] = l;
  }
  __syncthreads();
  float const mq = shared_ml[0], l = shared_ml[1];
  bool const empty = mq == -::cuda::std::numeric_limits<float>::infinity();
  for (int d = threadIdx.x; d < a.dv; d += attn_threads) {
    int const s = d / a.dsub_v;
    float sum = 0.f;
    if (!empty) {
      for (int j = 0; j < a.slices; ++j) {
        sum += a.part[(static_cast<std::size_t>(s * a.slices + j) * a.q_heads + h) * a.dv + d];
      }
    }
    a.out[static_cast<std::size_t>(h) * a.dv + a.vmap.perm[d]] = empty ? 0.f : sum / l;
  }
  if (threadIdx.x == 0 && a.lse != nullptr) {
    a.lse[h] = empty ? -::cuda::std::numeric_limits<float>::infinity() : mq + logf(l);
  }
}

template <class KCode, class VCode>
void launch_attention(attn_args<KCode, VCode> const& a, int key_cb_heads, std::size_t lut_smem,
                      std::size_t scan_smem, std::size_t value_smem, cudaStream_t stream)
{
  // Shared-memory limits are set at each launch (host-side calls, allowed
  // during stream capture), so only the code types actually used are compiled.
  bool const int_hist = int_hist_fits(static_cast<std::size_t>(a.group) * a.nv * a.ksub_v);
  PQKV_CUDA_TRY(cudaFuncSetAttribute(lut_kernel<KCode, VCode>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(lut_smem)));
  PQKV_CUDA_TRY(cudaFuncSetAttribute(int_hist ? scan_kernel<KCode, VCode, true> : scan_kernel<KCode, VCode, false>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(scan_smem)));
  PQKV_CUDA_TRY(cudaFuncSetAttribute(value_kernel<KCode, VCode>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(value_smem)));
  dim3 const lut_grid(static_cast<unsigned>((a.ksub_k + lut_codewords - 1) / lut_codewords),
                      static_cast<unsigned>(a.nk), static_cast<unsigned>(key_cb_heads));
  lut_kernel<KCode, VCode><<<lut_grid, attn_threads, lut_smem, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
  dim3 const scan_grid(static_cast<unsigned>(a.chunks), static_cast<unsigned>(a.kv_heads));
  if (int_hist) {
    scan_kernel<KCode, VCode, true><<<scan_grid, attn_threads, scan_smem, stream>>>(a);
  } else {
    scan_kernel<KCode, VCode, false><<<scan_grid, attn_threads, scan_smem, stream>>>(a);
  }
  PQKV_CUDA_CHECK_LAST();
  value_kernel<KCode, VCode><<<dim3(static_cast<unsigned>(a.slices), static_cast<unsigned>(a.splits_v),
                                    static_cast<unsigned>(a.kv_heads)),
                               attn_threads, value_smem, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
  finalize_kernel<KCode, VCode><<<static_cast<unsigned>(a.q_heads), attn_threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

}  // namespace pqkv::detail::rq_gpu
