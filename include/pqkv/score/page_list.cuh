// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file GPU page-list helpers (`pqkv::gpu`): the contract of
/// `score/page_list.hpp`, exactly (integer results, equal to the CPU's).
///
/// Every call validates its host-side arguments, then only launches: no
/// allocation, no host sync, no workspace; device values (selections, valid
/// counts, block-table entries, seq_lens) are read on the device, so the
/// calls are CUDA-graph capturable and replayable as they change.
/// `to_page_indices` is one launch (a block per row); `to_paged_kv` three
/// (row page counts into kv_indptr[1..], one block scanning them in place,
/// then a block per row writing its pages at kv_indptr[row]).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/score/page_list.hpp>

#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <span>

namespace pqkv::detail::page_list_gpu {

inline constexpr int threads = 256;
inline constexpr int items = 4;      ///< consecutive selection entries per thread and tile
inline constexpr int scan_threads = 1024;

/// Where the pages of a row go.
enum class sink_mode { pages, count, flat };

struct row_args {
  std::int32_t const* sel;      // [rows, k]
  std::int32_t const* valid;    // [rows]
  std::int32_t const* table;    // [batch, width] or null
  std::int32_t const* seq_lens; // [batch] (count mode)
  std::int32_t* pages;          // pages mode: [rows, out_k]; flat mode: kv_indices
  std::int32_t* counts;         // pages mode: [rows]; count mode: kv_indptr (row + 1)
  std::int32_t* last_len;       // count mode: [rows]
  std::int32_t const* indptr;   // flat mode: [rows + 1]
  std::int64_t k, out_k, width, page_size, heads, rows, indices_size;
};

/// One block per row: the pages the contract emits, compacted in order with
/// a block scan per tile of threads * items entries.
template <sink_mode Mode>
__global__ void __launch_bounds__(threads) row_pages_kernel(row_args a)
{
  using scan = cub::BlockScan<int, threads>;
  __shared__ typename scan::TempStorage temp;
  std::int64_t const row = blockIdx.x;
  std::int64_t const b = row / a.heads;
  std::int32_t const* sel = a.sel + row * a.k;
  std::int32_t const* table_row = a.table != nullptr ? a.table + b * a.width : nullptr;
  std::int64_t const n = pqkv::detail::page_list::clamp_count(a.valid[row], a.k);
  std::int64_t base_out = 0;
  std::int32_t* out = nullptr;
  if constexpr (Mode == sink_mode::pages) { out = a.pages + row * a.out_k; }
  if constexpr (Mode == sink_mode::flat) {
    base_out = a.indptr[row];
    out = a.pages + base_out;
  }
  std::int64_t emitted = 0;
  constexpr std::int64_t tile = static_cast<std::int64_t>(threads) * items;
  for (std::int64_t t0 = 0; t0 < n; t0 += tile) {
    std::int64_t const i0 = t0 + static_cast<std::int64_t>(threadIdx.x) * items;
    std::int64_t p[items];
    int flags = 0;
#pragma unroll
    for (int j = 0; j < items; ++j) {
      std::int64_t const i = i0 + j;
      p[j] = i < n ? pqkv::detail::page_list::logical_page(sel[i], a.page_size) : -1;
      std::int64_t const prev = i > 0 && i < n ? pqkv::detail::page_list::logical_page(sel[i - 1], a.page_size) : -1;
      bool const emit = i < n && p[j] >= 0 && (i == 0 || p[j] != prev);
      flags |= (emit ? 1 : 0) << j;
    }
    int rank = 0, total = 0;
    scan(temp).ExclusiveSum(__popc(flags), rank, total);
    __syncthreads();  // temp is reused by the next tile
    if constexpr (Mode != sink_mode::count) {
      std::int64_t q = emitted + rank;
#pragma unroll
      for (int j = 0; j < items; ++j) {
        if ((flags >> j) & 1) { out[q++] = pqkv::detail::page_list::map_page(p[j], table_row, a.width); }
      }
    }
    emitted += total;
  }
  if constexpr (Mode == sink_mode::pages) {
    for (std::int64_t i = emitted + threadIdx.x; i < a.out_k; i += threads) { out[i] = -1; }
    if (threadIdx.x == 0) { a.counts[row] = static_cast<std::int32_t>(emitted); }
  }
  if constexpr (Mode == sink_mode::count) {
    if (threadIdx.x == 0) {
      a.counts[row + 1] = static_cast<std::int32_t>(emitted);
      // The last emitted page is that of the last entry with a page (runs of
      // equal pages start with an emission).
      std::int64_t len = 0;
      for (std::int64_t i = n - 1; i >= 0; --i) {
        std::int64_t const last = pqkv::detail::page_list::logical_page(sel[i], a.page_size);
        if (last >= 0) {
          len = static_cast<std::int64_t>(a.seq_lens[b]) - last * a.page_size;
          len = len < 1 ? 1 : (len > a.page_size ? a.page_size : len);
          break;
        }
      }
      a.last_len[row] = static_cast<std::int32_t>(len);
    }
  }
  if constexpr (Mode == sink_mode::flat) {
    // The unused tail of kv_indices, shared out over the row blocks.
    std::int64_t const used = a.indptr[a.rows];
    for (std::int64_t i = used + row * threads + threadIdx.x; i < a.indices_size; i += a.rows * threads) {
      a.pages[i] = -1;
    }
  }
}

/// One block: kv_indptr[1..rows] (the rows' counts) becomes their inclusive
/// scan, kv_indptr[0] = 0.
template <int Unused = 0>
__global__ void __launch_bounds__(scan_threads) scan_kernel(std::int32_t* indptr, std::int64_t rows)
{
  using scan = cub::BlockScan<std::int32_t, scan_threads>;
  __shared__ typename scan::TempStorage temp;
  std::int32_t carry = 0;
  if (threadIdx.x == 0) { indptr[0] = 0; }
  for (std::int64_t r0 = 0; r0 < rows; r0 += scan_threads) {
    std::int64_t const r = r0 + threadIdx.x;
    std::int32_t const x = r < rows ? indptr[r + 1] : 0;
    std::int32_t incl = 0, total = 0;
    scan(temp).InclusiveSum(x, incl, total);
    __syncthreads();
    if (r < rows) { indptr[r + 1] = carry + incl; }
    carry += total;
  }
}

/// Token indices to physical slots, one thread per entry.
template <int Unused = 0>
__global__ void slots_kernel(std::int32_t const* sel, std::int32_t const* table, std::int32_t* slots,
                             std::int64_t total, std::int64_t per_seq, std::int64_t width, std::int64_t page_size,
                             std::int64_t stride)
{
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    std::int64_t const b = i / per_seq;
    slots[i] = pqkv::detail::page_list::physical_slot(sel[i], table + b * width, width, page_size, stride);
  }
}

}  // namespace pqkv::detail::page_list_gpu

namespace pqkv::gpu {

/// `pqkv::cpu::to_page_indices` on the GPU (all views device memory; pass
/// `{}` as block_table for logical pages). One launch on `stream`.
inline void to_page_indices(view<std::int32_t const, 3> selections,    // [batch, kv_heads, k]
                            view<std::int32_t const, 2> valid_counts,  // [batch, kv_heads]
                            index_t page_size,
                            view<std::int32_t const, 2> block_table,   // [batch, max_pages_per_seq] or {}
                            view<std::int32_t, 3> pages,               // [batch, kv_heads, >= k], -1 padded
                            view<std::int32_t, 2> page_counts,         // [batch, kv_heads]
                            cudaStream_t stream)
{
  constexpr char const* where = "gpu::to_page_indices";
  namespace pl = pqkv::detail::page_list;
  namespace kern = pqkv::detail::page_list_gpu;
  pl::check_page_indices(selections, valid_counts, page_size, block_table, pages, page_counts, where);
  index_t const rows = selections.extent(0) * selections.extent(1);
  if (rows == 0) { return; }
  kern::row_args a{};
  a.sel = selections.data_handle();
  a.valid = valid_counts.data_handle();
  a.table = block_table.data_handle();
  a.pages = pages.data_handle();
  a.counts = page_counts.data_handle();
  a.k = selections.extent(2);
  a.out_k = pages.extent(2);
  a.width = block_table.extent(1);
  a.page_size = page_size;
  a.heads = selections.extent(1);
  a.rows = rows;
  kern::row_pages_kernel<kern::sink_mode::pages><<<static_cast<unsigned>(rows), kern::threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

/// `pqkv::cpu::to_paged_kv` on the GPU: FlashInfer's kv_indptr, kv_indices
/// and kv_last_page_len for the selected pages, one request per (sequence,
/// KV head) row. Three launches on `stream`; no workspace (the counts are
/// staged in kv_indptr).
inline void to_paged_kv(view<std::int32_t const, 3> selections,    // [batch, kv_heads, k]
                        view<std::int32_t const, 2> valid_counts,  // [batch, kv_heads]
                        std::span<std::int32_t const> seq_lens,    // [batch]
                        index_t page_size,
                        view<std::int32_t const, 2> block_table,   // [batch, max_pages_per_seq] or {}
                        std::span<std::int32_t> kv_indptr,         // [rows + 1]
                        std::span<std::int32_t> kv_indices,        // [>= rows * k]
                        std::span<std::int32_t> kv_last_page_len,  // [rows]
                        cudaStream_t stream)
{
  constexpr char const* where = "gpu::to_paged_kv";
  namespace pl = pqkv::detail::page_list;
  namespace kern = pqkv::detail::page_list_gpu;
  pl::check_paged_kv(selections, valid_counts, seq_lens, page_size, block_table, kv_indptr, kv_indices,
                     kv_last_page_len, where);
  index_t const rows = selections.extent(0) * selections.extent(1);
  kern::row_args a{};
  a.sel = selections.data_handle();
  a.valid = valid_counts.data_handle();
  a.table = block_table.data_handle();
  a.seq_lens = seq_lens.data();
  a.pages = kv_indices.data();
  a.counts = kv_indptr.data();
  a.last_len = kv_last_page_len.data();
  a.indptr = kv_indptr.data();
  a.k = selections.extent(2);
  a.width = block_table.extent(1);
  a.page_size = page_size;
  a.heads = selections.extent(1);
  a.rows = rows;
  a.indices_size = static_cast<std::int64_t>(kv_indices.size());
  if (rows == 0) {
    // kv_indptr = {0}; every kv_indices entry is unused.
    PQKV_CUDA_TRY(cudaMemsetAsync(kv_indptr.data(), 0, sizeof(std::int32_t), stream));
    if (!kv_indices.empty()) {
      PQKV_CUDA_TRY(cudaMemsetAsync(kv_indices.data(), 0xFF, kv_indices.size_bytes(), stream));
    }
    return;
  }
  auto const grid = static_cast<unsigned>(rows);
  kern::row_pages_kernel<kern::sink_mode::count><<<grid, kern::threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
  kern::scan_kernel<><<<1, kern::scan_threads, 0, stream>>>(kv_indptr.data(), rows);
  PQKV_CUDA_CHECK_LAST();
  kern::row_pages_kernel<kern::sink_mode::flat><<<grid, kern::threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

/// `pqkv::cpu::to_physical_slots` on the GPU (page_stride 0 means
/// page_size). One launch on `stream`.
inline void to_physical_slots(view<std::int32_t const, 3> selections,   // [batch, kv_heads, k]
                              index_t page_size,
                              view<std::int32_t const, 2> block_table,  // [batch, max_pages_per_seq]
                              view<std::int32_t, 3> slots,              // [batch, kv_heads, k]
                              index_t page_stride,
                              cudaStream_t stream)
{
  constexpr char const* where = "gpu::to_physical_slots";
  pqkv::detail::page_list::check_physical_slots(selections, page_size, block_table, slots, page_stride, where);
  std::int64_t const total = element_count(selections);
  if (total == 0) { return; }
  std::int64_t const blocks = (total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096;
  pqkv::detail::page_list_gpu::slots_kernel<><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
    selections.data_handle(), block_table.data_handle(), slots.data_handle(), total,
    selections.extent(1) * selections.extent(2), block_table.extent(1), page_size,
    page_stride > 0 ? page_stride : page_size);
  PQKV_CUDA_CHECK_LAST();
}

/// As above with page_stride = page_size.
inline void to_physical_slots(view<std::int32_t const, 3> selections, index_t page_size,
                              view<std::int32_t const, 2> block_table, view<std::int32_t, 3> slots,
                              cudaStream_t stream)
{
  to_physical_slots(selections, page_size, block_table, slots, 0, stream);
}

}  // namespace pqkv::gpu
