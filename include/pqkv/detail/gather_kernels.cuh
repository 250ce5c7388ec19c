// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of the pinned KV store (offload/kv_store.cuh) and of the
/// zero-copy gather (offload/gather.cuh). Users never name this header.
///
/// The gather reads host rows through their mapped device addresses: every
/// thread moves 16-byte vectors (narrower only when a row's byte size or a
/// base address forces it), a thread keeps `gather_unroll` K and as many V
/// vectors in flight before it stores any, and the grid is sized so that each
/// SM holds several blocks: PCIe latency (~1-2 us) times its bandwidth is far
/// below the bytes in flight, so the link stays busy. The committed counts
/// (stored by the copy stream after the rows' bytes land) are read past every
/// cache (ld.global.cv), once per block.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/views.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pqkv::detail::gather_gpu {

inline constexpr int block_threads = 256;
inline constexpr int gather_unroll = 4;

/// How the gather loads host rows. `volatile_` (ld.global.cv) refetches on
/// every access, so a row rewritten after `truncate` is never served stale
/// from a cache; `streaming` (ld.global.cs) only marks lines evict-first.
enum class load_kind : int { volatile_, streaming };

/// Parameters of one gather launch; plain pointers, validated on the host.
struct gather_args {
  std::byte const* k_src;             // mapped store K of the layer: [sequences, kv_heads, capacity, row_bytes]
  std::byte const* v_src;             // same for V
  std::int32_t const* committed;      // [sequences] rows safe to read per sequence (device)
  std::int32_t const* src_index;      // [rows, n] store rows, -1 padded
  std::int32_t const* dst_index;      // [rows, n] destination rows, or null: destination row = j
  std::int32_t const* row_counts;     // [rows] entries to read per row (device), or null: n
  std::byte* k_dst;                   // [rows, dst_rows, row_bytes]
  std::byte* v_dst;                   // [rows, dst_rows, row_bytes]
  std::int32_t* rejected;             // device counter of out-of-range entries, or null
  std::int64_t capacity;              // rows per (sequence, head) in the store
  std::int64_t dst_rows;              // destination rows per row
  std::int64_t n;                     // entries per row
  std::int64_t rows;                  // batch * kv_heads
  int batch;                          // sequences gathered (rows / kv_heads)
  int kv_heads;
  int vecs_per_row;                   // row_bytes / vector width
};

template <class Vec, load_kind Load>
__device__ __forceinline__ Vec load_host(Vec const* p)
{
  if constexpr (Load == load_kind::volatile_) {
    return __ldcv(p);
  } else {
    return __ldcs(p);
  }
}

/// Resolves entry e: false when it is skipped (padding, past row_counts, a
/// negative destination) or rejected (counted when `count`); else the vector
/// offsets of its source and destination rows.
__device__ __forceinline__ bool resolve_entry(gather_args const& a, std::int64_t e, std::int32_t const* committed,
                                              bool count, std::int64_t& src_off, std::int64_t& dst_off)
{
  std::int64_t const row = e / a.n;
  std::int64_t const j = e - row * a.n;
  if (a.row_counts != nullptr && j >= static_cast<std::int64_t>(a.row_counts[row])) { return false; }
  std::int32_t const src = a.src_index[e];
  std::int32_t const dst = a.dst_index == nullptr ? static_cast<std::int32_t>(j) : a.dst_index[e];
  if (src < 0 || dst < 0) { return false; }
  if (src >= committed[row / a.kv_heads] || dst >= a.dst_rows) {
    if (count && a.rejected != nullptr) { atomicAdd(a.rejected, 1); }
    return false;
  }
  auto const vpr = static_cast<std::int64_t>(a.vecs_per_row);
  src_off = (row * a.capacity + src) * vpr;
  dst_off = (row * a.dst_rows + dst) * vpr;
  return true;
}

/// Each block first snapshots the committed counts of the batch in shared
/// memory, and every entry is copied by the threads of one block, so a row
/// racing with an append is copied whole or skipped whole. A tile is
/// block_threads / vecs_per_row consecutive entries, one thread per vector; a
/// thread takes `gather_unroll` tiles spaced by the grid, loads K and V of all
/// of them, then stores. Rows wider than block_threads vectors take one block
/// per entry.
template <class Vec, load_kind Load>
__global__ void __launch_bounds__(block_threads) gather_kernel(gather_args a)
{
  extern __shared__ std::int32_t s_committed[];  // [batch]
  for (int i = static_cast<int>(threadIdx.x); i < a.batch; i += block_threads) {
    s_committed[i] = __ldcv(a.committed + i);
  }
  __syncthreads();
  int const vpr = a.vecs_per_row;
  std::int64_t const entries = a.rows * a.n;
  Vec const* k_src = reinterpret_cast<Vec const*>(a.k_src);
  Vec const* v_src = reinterpret_cast<Vec const*>(a.v_src);
  Vec* k_dst = reinterpret_cast<Vec*>(a.k_dst);
  Vec* v_dst = reinterpret_cast<Vec*>(a.v_dst);
  if (vpr > block_threads) {
    for (std::int64_t e = blockIdx.x; e < entries; e += gridDim.x) {
      std::int64_t so = 0, d = 0;
      if (!resolve_entry(a, e, s_committed, threadIdx.x == 0, so, d)) { continue; }
      for (int v = static_cast<int>(threadIdx.x); v < vpr; v += block_threads) {
        Vec const kx = load_host<Vec, Load>(k_src + so + v);
        Vec const vx = load_host<Vec, Load>(v_src + so + v);
        k_dst[d + v] = kx;
        v_dst[d + v] = vx;
      }
    }
    return;
  }
  int const per_tile = block_threads / vpr;
  int const le = static_cast<int>(threadIdx.x) / vpr;
  int const vec = static_cast<int>(threadIdx.x) - le * vpr;
  if (le >= per_tile) { return; }  // the few threads past the last whole entry; no barrier follows
  std::int64_t const tiles = (entries + per_tile - 1) / per_tile;
  std::int64_t const grid = gridDim.x;
  for (std::int64_t t0 = blockIdx.x; t0 < tiles; t0 += grid * gather_unroll) {
    Vec kv[gather_unroll], vv[gather_unroll];
    std::int64_t dst_off[gather_unroll];
#pragma unroll
    for (int u = 0; u < gather_unroll; ++u) {
      dst_off[u] = -1;
      std::int64_t const t = t0 + u * grid;
      std::int64_t const e = t * per_tile + le;
      if (t >= tiles || e >= entries) { continue; }
      std::int64_t so = 0, d = 0;
      if (!resolve_entry(a, e, s_committed, vec == 0, so, d)) { continue; }
      kv[u] = load_host<Vec, Load>(k_src + so + vec);
      vv[u] = load_host<Vec, Load>(v_src + so + vec);
      dst_off[u] = d + vec;
    }
#pragma unroll
    for (int u = 0; u < gather_unroll; ++u) {
      if (dst_off[u] < 0) { continue; }
      k_dst[dst_off[u]] = kv[u];
      v_dst[dst_off[u]] = vv[u];
    }
  }
}

/// The widest vector (16, 8, 4, 2 or 1 bytes) that divides the row size and
/// every base address.
inline int vector_bytes(std::size_t row_bytes, std::uintptr_t addresses)
{
  for (int w : {16, 8, 4, 2}) {
    if (row_bytes % static_cast<std::size_t>(w) == 0 && addresses % static_cast<std::uintptr_t>(w) == 0) { return w; }
  }
  return 1;
}

template <load_kind Load>
void launch_gather_as(gather_args a, int vec_bytes, int blocks, cudaStream_t stream)
{
  dim3 const grid{static_cast<unsigned>(blocks)};
  std::size_t const smem = static_cast<std::size_t>(a.batch) * sizeof(std::int32_t);
  switch (vec_bytes) {
    case 16: gather_kernel<uint4, Load><<<grid, block_threads, smem, stream>>>(a); break;
    case 8: gather_kernel<uint2, Load><<<grid, block_threads, smem, stream>>>(a); break;
    case 4: gather_kernel<unsigned int, Load><<<grid, block_threads, smem, stream>>>(a); break;
    case 2: gather_kernel<unsigned short, Load><<<grid, block_threads, smem, stream>>>(a); break;
    default: gather_kernel<unsigned char, Load><<<grid, block_threads, smem, stream>>>(a); break;
  }
  PQKV_CUDA_CHECK_LAST();
}

/// Largest batch whose committed counts fit the gather's shared snapshot.
inline constexpr std::int64_t max_gather_batch = 8192;

/// Launches the gather: enough blocks for every tile at `gather_unroll` tiles
/// per thread, at most `max_blocks`.
inline void launch_gather(gather_args a, std::size_t row_bytes, int max_blocks, load_kind load, cudaStream_t stream)
{
  auto const addresses = reinterpret_cast<std::uintptr_t>(a.k_src) | reinterpret_cast<std::uintptr_t>(a.v_src) |
                         reinterpret_cast<std::uintptr_t>(a.k_dst) | reinterpret_cast<std::uintptr_t>(a.v_dst);
  int const vec = vector_bytes(row_bytes, addresses);
  a.vecs_per_row = static_cast<int>(row_bytes / static_cast<std::size_t>(vec));
  std::int64_t const entries = a.rows * a.n;
  if (entries == 0 || a.vecs_per_row == 0) { return; }
  std::int64_t blocks = entries;
  if (a.vecs_per_row <= block_threads) {
    std::int64_t const tiles = (entries + block_threads / a.vecs_per_row - 1) / (block_threads / a.vecs_per_row);
    blocks = (tiles + gather_unroll - 1) / gather_unroll;
  }
  if (blocks > max_blocks) { blocks = max_blocks; }
  if (load == load_kind::volatile_) {
    launch_gather_as<load_kind::volatile_>(a, vec, static_cast<int>(blocks), stream);
  } else {
    launch_gather_as<load_kind::streaming>(a, vec, static_cast<int>(blocks), stream);
  }
}

/// Publishes a sequence's committed row count once the copies before it in
/// the stream have landed; `__threadfence_system` orders it after them for
/// readers on other streams.
template <int Unused = 0>
__global__ void set_committed_kernel(std::int32_t* committed, std::int32_t value)
{
  __threadfence_system();
  *reinterpret_cast<std::int32_t volatile*>(committed) = value;
  __threadfence_system();
}

inline void launch_set_committed(std::int32_t* committed, std::int32_t value, cudaStream_t stream)
{
  set_committed_kernel<><<<1, 1, 0, stream>>>(committed, value);
  PQKV_CUDA_CHECK_LAST();
}

/// Rows [kv_heads, tokens, row_bytes] of K and V (device memory, head stride
/// and row stride in bytes) into the mapped store at the committed count of
/// one (layer, sequence), read on the device. One block copies one row with
/// the widest stores (16, 4 or 1 bytes) that row, strides and addresses allow. A call that
/// would pass `capacity` writes nothing and raises `*overflow`.
struct append_args {
  std::byte const* k_src;
  std::byte const* v_src;
  std::int64_t src_head_stride;  // bytes
  std::int64_t src_row_stride;   // bytes
  std::byte* k_dst;              // mapped store: this (layer, sequence)'s [kv_heads, capacity, row_bytes]
  std::byte* v_dst;
  std::int64_t capacity;
  std::int64_t row_bytes;
  std::int32_t* committed;  // this (layer, sequence)'s count
  std::int32_t* overflow;
  int kv_heads;
  int tokens;
};

template <class Word>
__device__ __forceinline__ void copy_row(std::byte* dst, std::byte const* src, std::int64_t bytes)
{
  auto* d = reinterpret_cast<Word*>(dst);
  auto const* s = reinterpret_cast<Word const*>(src);
  for (std::int64_t i = threadIdx.x; i < bytes / static_cast<std::int64_t>(sizeof(Word)); i += blockDim.x) { d[i] = s[i]; }
}

template <int Unused = 0>
__global__ void append_rows_kernel(append_args a)
{
  std::int64_t const pos = *reinterpret_cast<std::int32_t const volatile*>(a.committed);
  if (pos + a.tokens > a.capacity) {
    if (blockIdx.x == 0 && threadIdx.x == 0) { atomicAdd(a.overflow, 1); }
    return;
  }
  int const head = static_cast<int>(blockIdx.x) / a.tokens;
  int const t = static_cast<int>(blockIdx.x) % a.tokens;
  std::int64_t const src = head * a.src_head_stride + t * a.src_row_stride;
  std::int64_t const dst = (head * a.capacity + pos + t) * a.row_bytes;
  // The widest word that every address and stride is a multiple of.
  auto const align = static_cast<std::uint64_t>(a.row_bytes | a.src_head_stride | a.src_row_stride) |
                     reinterpret_cast<std::uintptr_t>(a.k_src) | reinterpret_cast<std::uintptr_t>(a.v_src) |
                     reinterpret_cast<std::uintptr_t>(a.k_dst) | reinterpret_cast<std::uintptr_t>(a.v_dst);
  if (align % 16 == 0) {
    copy_row<uint4>(a.k_dst + dst, a.k_src + src, a.row_bytes);
    copy_row<uint4>(a.v_dst + dst, a.v_src + src, a.row_bytes);
  } else if (align % 4 == 0) {
    copy_row<std::uint32_t>(a.k_dst + dst, a.k_src + src, a.row_bytes);
    copy_row<std::uint32_t>(a.v_dst + dst, a.v_src + src, a.row_bytes);
  } else {
    copy_row<unsigned char>(a.k_dst + dst, a.k_src + src, a.row_bytes);
    copy_row<unsigned char>(a.v_dst + dst, a.v_src + src, a.row_bytes);
  }
}

/// After append_rows_kernel on the same stream: raises the count unless that
/// call overflowed (the same test on the same count).
template <int Unused = 0>
__global__ void advance_committed_kernel(std::int32_t* committed, std::int64_t capacity, int tokens)
{
  std::int32_t const pos = *reinterpret_cast<std::int32_t volatile*>(committed);
  if (pos + static_cast<std::int64_t>(tokens) > capacity) { return; }
  __threadfence_system();
  *reinterpret_cast<std::int32_t volatile*>(committed) = pos + tokens;
  __threadfence_system();
}

inline void launch_append_at_committed(append_args const& a, cudaStream_t stream)
{
  append_rows_kernel<><<<a.kv_heads * a.tokens, 128, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
  advance_committed_kernel<><<<1, 1, 0, stream>>>(a.committed, a.capacity, a.tokens);
  PQKV_CUDA_CHECK_LAST();
}

}  // namespace pqkv::detail::gather_gpu
