// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The nearest-centroid tile engine shared by `pqkv::gpu::pq_encoder`
/// (encode/encode.cuh) and `pqkv::gpu::kmeans_trainer` (codebook/kmeans.cuh),
/// and the encoder's kernels. Users never name this header.
///
/// A block of 256 threads (16 x 16) takes 128 rows of one (head, subspace)
/// problem at a time against all of the problem's centroids, which stay in
/// shared memory, channel-major. Each thread holds an 8 rows x Tn centroids
/// register tile; each accumulator is one distance, evaluated by the
/// reference's own float chain in channel order, so the argmin is the
/// reference's bit for bit:
///   exact form (encoder):  acc = 0;        acc = fma(x_j - c_j, x_j - c_j, acc)
///   gemm form  (trainer):  acc = ||c||^2;  acc = fma(x_j, -2 c_j, acc)
/// A thread scans its centroids in ascending order with a strict `<`; the 16
/// threads of a row group then combine (value, index) pairs, the lower index
/// winning ties, which is the lowest index among the minima as in the
/// reference's scan. Distances are never written to memory.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/views.hpp>

#include <cuda/std/limits>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pqkv::detail::nearest_gpu {

inline constexpr int threads = 256;
inline constexpr int tm = 8;              ///< rows per thread
inline constexpr int bm = 16 * tm;        ///< rows per tile
inline constexpr int xs_stride = bm + 4;  ///< floats per channel row of the row tile (16-byte aligned, skewed)

/// Centroids per thread and tile column: the smallest padding for ksub.
[[nodiscard]] constexpr int tn_for(int ksub) noexcept { return ksub >= 128 ? 8 : ksub >= 64 ? 4 : ksub >= 32 ? 2 : 1; }
/// ksub rounded up to whole 16 x Tn centroid tiles.
[[nodiscard]] constexpr int kpad_for(int ksub) noexcept
{
  int const bn = 16 * tn_for(ksub);
  return (ksub + bn - 1) / bn * bn;
}
/// Whether the GPU kernels are instantiated for this sub-vector size.
[[nodiscard]] constexpr bool dsub_supported(index_t dsub) noexcept
{
  return dsub == 4 || dsub == 8 || dsub == 16 || dsub == 32 || dsub == 64 || dsub == 128;
}

enum class form { exact, gemm };

/// Loads Tn consecutive floats from shared memory (16-byte vectors where Tn allows).
template <int Tn>
__device__ __forceinline__ void load_row(float const* p, float (&v)[Tn])
{
  if constexpr (Tn >= 4) {
#pragma unroll
    for (int q = 0; q < Tn / 4; ++q) {
      float4 const f = reinterpret_cast<float4 const*>(p)[q];
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
  } else if constexpr (Tn == 2) {
    float2 const f = *reinterpret_cast<float2 const*>(p);
    v[0] = f.x;
    v[1] = f.y;
  } else {
    v[0] = p[0];
  }
}

/// The argmin of rows [ty * tm, ty * tm + tm) of the tile `xs` [Dsub][xs_stride]
/// over centroids `cs` [Dsub][kpad] (and, gemm form, norms `cn` [kpad]); only
/// indices < ksub count. On return every lane of the 16-lane group holds the
/// row group's (best, index). All 32 lanes of each warp must call it.
template <int Dsub, int Tn, form Form>
__device__ __forceinline__ void tile_argmin(float const* __restrict__ cs, float const* __restrict__ cn, int kpad,
                                            int ksub, float const* __restrict__ xs, int ty, int tx,
                                            float (&best)[tm], int (&bidx)[tm])
{
#pragma unroll
  for (int i = 0; i < tm; ++i) {
    best[i] = ::cuda::std::numeric_limits<float>::infinity();
    bidx[i] = 0;
  }
  for (int n0 = 0; n0 < kpad; n0 += 16 * Tn) {
    int const c0 = n0 + tx * Tn;
    float acc[tm][Tn];
#pragma unroll
    for (int j = 0; j < Tn; ++j) {
      float const init = Form == form::gemm ? cn[c0 + j] : 0.f;
#pragma unroll
      for (int i = 0; i < tm; ++i) { acc[i][j] = init; }
    }
#pragma unroll 4
    for (int ch = 0; ch < Dsub; ++ch) {
      float xv[tm];
      float cv[Tn];
      load_row<tm>(xs + ch * xs_stride + ty * tm, xv);
      load_row<Tn>(cs + ch * kpad + c0, cv);
#pragma unroll
      for (int i = 0; i < tm; ++i) {
#pragma unroll
        for (int j = 0; j < Tn; ++j) {
          if constexpr (Form == form::gemm) {
            acc[i][j] = fmaf(xv[i], cv[j], acc[i][j]);
          } else {
            float const d = __fsub_rn(xv[i], cv[j]);
            acc[i][j] = fmaf(d, d, acc[i][j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < Tn; ++j) {
      if (c0 + j < ksub) {
#pragma unroll
        for (int i = 0; i < tm; ++i) {
          if (acc[i][j] < best[i]) {
            best[i] = acc[i][j];
            bidx[i] = c0 + j;
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < tm; ++i) {
#pragma unroll
    for (int off = 8; off >= 1; off /= 2) {
      float const ov = __shfl_xor_sync(0xffffffffu, best[i], off);
      int const oi = __shfl_xor_sync(0xffffffffu, bidx[i], off);
      if (ov < best[i] || (ov == best[i] && oi < bidx[i])) {
        best[i] = ov;
        bidx[i] = oi;
      }
    }
  }
}

/// Shared-memory floats of the centroid part of a block: cs [dsub][kpad] (+ cn [kpad]).
[[nodiscard]] constexpr std::size_t centroid_floats(int dsub, int ksub, bool norms) noexcept
{
  return static_cast<std::size_t>(dsub) * kpad_for(ksub) + (norms ? static_cast<std::size_t>(kpad_for(ksub)) : 0);
}

// ---- encoder -------------------------------------------------------------------------------

/// Encoder launch parameters: plain pointers and sizes, validated on the host.
template <class Key>
struct encode_args {
  Key const* keys;            // [heads, tokens, dim], strides s0, s1, s2
  index_t s0, s1, s2;
  float const* centroids;     // [heads, m, ksub, dsub]
  std::uint8_t* codes;        // [heads, capacity, m]
  index_t tokens, capacity;
  index_t position;           // first code row written, when position_dev is null
  index_t const* position_dev;  // device: the first code row written (read once per block)
  int m, ksub;
  index_t rows_per_block;     // a multiple of bm
};

/// Dynamic shared memory of the encode kernel.
[[nodiscard]] constexpr std::size_t encode_smem_bytes(int dsub, int ksub) noexcept
{
  return (centroid_floats(dsub, ksub, false) + static_cast<std::size_t>(dsub) * xs_stride) * sizeof(float);
}

/// grid (heads * m, blocks per problem): codes of the problem's token range
/// [blockIdx.y * rows_per_block, ...) written at row position + t. A position
/// read from the device that would write past the capacity writes nothing.
template <class Key, int Dsub, int Tn>
__global__ void __launch_bounds__(threads, Dsub >= 128 ? 1 : 2) encode_kernel(encode_args<Key> a)
{
  extern __shared__ __align__(16) float smem[];
  int const kpad = kpad_for(a.ksub);
  float* const cs = smem;                                       // [Dsub][kpad]
  float* const xs = smem + static_cast<std::size_t>(Dsub) * kpad;  // [Dsub][xs_stride]
  int const p = blockIdx.x, h = p / a.m, s = p % a.m;
  int const tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  index_t const position = a.position_dev != nullptr ? *a.position_dev : a.position;
  if (position < 0 || position > a.capacity - a.tokens) { return; }
  index_t const r0 = static_cast<index_t>(blockIdx.y) * a.rows_per_block;
  index_t const r1 = r0 + a.rows_per_block < a.tokens ? r0 + a.rows_per_block : a.tokens;
  if (r0 >= r1) { return; }

  float const* const c = a.centroids + static_cast<std::size_t>(p) * a.ksub * Dsub;
  for (int e = tid; e < kpad * Dsub; e += threads) {
    int const k = e / Dsub, ch = e % Dsub;
    cs[ch * kpad + k] = k < a.ksub ? c[e] : 0.f;
  }
  Key const* const base = a.keys + h * a.s0 + static_cast<index_t>(s) * Dsub * a.s2;
  std::uint8_t* const out = a.codes + (static_cast<index_t>(h) * a.capacity + position) * a.m + s;
  for (index_t t0 = r0; t0 < r1; t0 += bm) {
    __syncthreads();  // the previous tile's readers are done (and, first time, cs is written)
    for (int e = tid; e < bm * Dsub; e += threads) {
      int const r = e / Dsub, ch = e % Dsub;
      index_t const t = t0 + r;
      xs[ch * xs_stride + r] = t < r1 ? to_float(base[t * a.s1 + ch * a.s2]) : 0.f;
    }
    __syncthreads();
    float best[tm];
    int bidx[tm];
    tile_argmin<Dsub, Tn, form::exact>(cs, nullptr, kpad, a.ksub, xs, ty, tx, best, bidx);
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < tm; ++i) {
        index_t const t = t0 + ty * tm + i;
        if (t < r1) { out[t * a.m] = static_cast<std::uint8_t>(bidx[i]); }
      }
    }
  }
}

/// Calls f.template operator()<Dsub>() for the runtime subspace width (4..128;
/// the tile engines here and in residual_gpu_kernels.cuh are built for these).
template <class F>
void dispatch_dsub(int dsub, F&& f)
{
  switch (dsub) {
    case 4: f.template operator()<4>(); break;
    case 8: f.template operator()<8>(); break;
    case 16: f.template operator()<16>(); break;
    case 32: f.template operator()<32>(); break;
    case 64: f.template operator()<64>(); break;
    default: f.template operator()<128>(); break;
  }
}

/// Calls f.template operator()<Dsub, Tn>() for the runtime pair.
template <class F>
void dispatch(int dsub, int ksub, F&& f)
{
  dispatch_dsub(dsub, [&]<int D>() {
    switch (tn_for(ksub)) {
      case 8: f.template operator()<D, 8>(); break;
      case 4: f.template operator()<D, 4>(); break;
      case 2: f.template operator()<D, 2>(); break;
      default: f.template operator()<D, 1>(); break;
    }
  });
}

/// Raises the encode kernel's dynamic shared-memory limit (a host call, made
/// once when the encoder is built so that calls stay capturable).
template <class Key>
void prepare_encode(int dsub, int ksub)
{
  dispatch(dsub, ksub, [&]<int D, int Tn>() {
    PQKV_CUDA_TRY(cudaFuncSetAttribute(encode_kernel<Key, D, Tn>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(encode_smem_bytes(D, ksub))));
  });
}

/// Resident encode blocks per SM.
template <class Key>
int encode_occupancy(int dsub, int ksub)
{
  int occ = 1;
  dispatch(dsub, ksub, [&]<int D, int Tn>() {
    PQKV_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, encode_kernel<Key, D, Tn>, threads,
                                                                encode_smem_bytes(D, ksub)));
  });
  return occ > 0 ? occ : 1;
}

/// Blocks per problem for `problems` problems of `tiles` row tiles each:
/// whole waves of `slots` resident blocks (the fewest that keep a block's
/// rows at most max_tiles tiles), never more blocks than tiles.
[[nodiscard]] inline index_t blocks_per_problem(index_t problems, index_t tiles, index_t slots, index_t max_tiles)
{
  index_t waves = 1, bpp = 1;
  for (;; ++waves) {
    bpp = slots * waves / problems;
    if (bpp < 1) { bpp = 1; }
    if (bpp >= tiles) { return tiles; }
    if ((tiles + bpp - 1) / bpp <= max_tiles) { return bpp; }
  }
}

template <class Key>
void launch_encode(encode_args<Key> const& a, int dsub, int problems, int blocks_per_problem, cudaStream_t stream)
{
  dispatch(dsub, a.ksub, [&]<int D, int Tn>() {
    encode_kernel<Key, D, Tn><<<dim3(static_cast<unsigned>(problems), static_cast<unsigned>(blocks_per_problem)),
                                threads, encode_smem_bytes(D, a.ksub), stream>>>(a);
    PQKV_CUDA_CHECK_LAST();
  });
}

}  // namespace pqkv::detail::nearest_gpu
