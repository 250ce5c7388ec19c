// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Gathers of selected K/V rows from the pinned store into GPU buffers.
///
/// `gpu::gather` (the decode path): a zero-copy kernel reads the rows straight
/// from the store's mapped host pages, driven by indices in device memory, so
/// the selection never visits the host: no host sync, no allocation, one
/// launch, CUDA-graph capturable.
///
/// Contract, for each row r = (b, h) of `indices` [batch, kv_heads, n] and each
/// entry j (the first `row_counts[r]` entries when row counts are given):
///  - an entry < 0 is padding: skipped, its output row left untouched;
///  - an entry in [0, committed(layer, b)) copies store row
///    K/V[layer, b, h, entry, :] to `k_out` / `v_out` [b, h, j, :] (with
///    destination rows: to row `dst_rows[b, h, j]`, skipped when that is < 0),
///    bit for bit;
///  - any other entry (at or past the committed count, so also >= capacity)
///    is rejected: nothing is read or written for it, and `rejected` (an
///    optional device counter) gains 1. Nothing is read out of bounds.
/// Entries are independent; duplicates are copied twice. Outputs of different
/// entries must not overlap (the caller's destination rows must be distinct).
/// Racing appends: each row is checked against one snapshot of the committed
/// count (taken once per thread block; a row is copied by one block), so it is
/// copied whole or skipped whole. At most `max_gather_batch` (8192) sequences
/// per call.
///
/// `gpu::copy_engine_gather` (the comparison path): host-side indices, runs of
/// consecutive rows merged, one `cudaMemcpyBatchAsync` of the runs. It needs
/// the selection on the host (what PQCache does, with a device-to-host copy
/// and a sync before), allocates host scratch as it grows, and is not
/// capturable; the zero-copy kernel is the faster path at decode sizes (see
/// docs/offload.md), so it is what the cache uses.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/gather_kernels.cuh>
#include <pqkv/offload/kv_store.cuh>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace pqkv::gpu {

/// How the zero-copy gather loads host rows (see detail/gather_kernels.cuh).
using gather_load = pqkv::detail::gather_gpu::load_kind;

/// Launch tuning of the zero-copy gather.
struct gather_params {
  int blocks_per_sm = 8;                   ///< grid cap, per SM
  gather_load load = gather_load::volatile_;  ///< volatile: never serves a stale cached line
};

}  // namespace pqkv::gpu

namespace pqkv::detail::gather_gpu {
inline int device_sms()
{
  int device = 0, sms = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms > 0 ? sms : 1;
}

template <class T, class Out>
void check_out(Out const& out, index_t batch, index_t kv_heads, index_t rows, index_t head_dim, char const* name,
               char const* where)
{
  PQKV_EXPECTS(out.extent(0) == batch && out.extent(1) == kv_heads && out.extent(3) == head_dim, where, name,
               " extents (", out.extent(0), ", ", out.extent(1), ", ", out.extent(2), ", ", out.extent(3),
               ") differ from (batch, kv_heads, *, head_dim)=(", batch, ", ", kv_heads, ", *, ", head_dim, ")");
  PQKV_EXPECTS(out.extent(2) >= rows, where, name, ".extent(2)=", out.extent(2), " < ", rows);
  PQKV_EXPECTS(out.data_handle() != nullptr || element_count(out) == 0, where, name, ".data_handle() is null");
}
}  // namespace pqkv::detail::gather_gpu

namespace pqkv::gpu {

/// Zero-copy gather of rows of `layer` into the outputs; see the file's contract.
/// @param indices    [batch, kv_heads, n] device, store rows, -1 padded
/// @param dst_rows   [batch, kv_heads, n] device destination rows, or an empty view (destination = j)
/// @param row_counts [batch * kv_heads] device entries to read per row, or empty (all n)
/// @param k_out      [batch, kv_heads, out_rows, head_dim] device
/// @param rejected   device counter of rejected entries, or null
/// Throws `pqkv::error` before the launch on a shape mismatch (batch above
/// the store's sequences, kv_heads or head_dim differing), a null pointer or a
/// layer out of range.
template <class T>
void gather(kv_store_ref<T> const& store, index_t layer, view<std::int32_t const, 3> indices,
            view<std::int32_t const, 3> dst_rows, std::span<std::int32_t const> row_counts, view<T, 4> k_out,
            view<T, 4> v_out, std::int32_t* rejected, cudaStream_t stream, gather_params const& params = {})
{
  constexpr char const* where = "gpu::gather";
  auto const& s = store.shape;
  PQKV_EXPECTS(store.keys != nullptr && store.values != nullptr && store.committed != nullptr, where,
               "store is an empty kv_store_ref");
  PQKV_EXPECTS(layer >= 0 && layer < s.layers, where, "layer=", layer, " is outside [0, ", s.layers, ")");
  index_t const batch = indices.extent(0), n = indices.extent(2);
  PQKV_EXPECTS(batch <= s.sequences, where, "indices.extent(0)=", batch, " exceeds the store's sequences=",
               s.sequences);
  PQKV_EXPECTS(batch <= pqkv::detail::gather_gpu::max_gather_batch, where, "indices.extent(0)=", batch,
               " exceeds ", pqkv::detail::gather_gpu::max_gather_batch, " sequences per call");
  PQKV_EXPECTS(indices.extent(1) == s.kv_heads, where, "indices.extent(1)=", indices.extent(1),
               ", store kv_heads=", s.kv_heads);
  PQKV_EXPECTS(n <= index_t{std::numeric_limits<std::int32_t>::max()}, where, "indices.extent(2)=", n,
               " exceeds the int32 range");
  bool const has_dst = dst_rows.data_handle() != nullptr || element_count(dst_rows) != 0;
  if (has_dst) {
    PQKV_EXPECTS(dst_rows.extent(0) == batch && dst_rows.extent(1) == s.kv_heads && dst_rows.extent(2) == n, where,
                 "dst_rows extents (", dst_rows.extent(0), ", ", dst_rows.extent(1), ", ", dst_rows.extent(2),
                 ") differ from indices (", batch, ", ", s.kv_heads, ", ", n, ")");
    PQKV_EXPECTS(dst_rows.data_handle() != nullptr || n * batch == 0, where, "dst_rows.data_handle() is null");
  }
  PQKV_EXPECTS(row_counts.empty() || static_cast<index_t>(row_counts.size()) == batch * s.kv_heads, where,
               "row_counts.size()=", row_counts.size(), ", batch * kv_heads=", batch * s.kv_heads);
  PQKV_EXPECTS(row_counts.empty() || row_counts.data() != nullptr, where, "row_counts.data() is null");
  index_t const min_rows = has_dst ? 0 : n;
  pqkv::detail::gather_gpu::check_out<T>(k_out, batch, s.kv_heads, min_rows, s.head_dim, "k_out", where);
  pqkv::detail::gather_gpu::check_out<T>(v_out, batch, s.kv_heads, min_rows, s.head_dim, "v_out", where);
  PQKV_EXPECTS(k_out.extent(2) == v_out.extent(2), where, "k_out.extent(2)=", k_out.extent(2),
               ", v_out.extent(2)=", v_out.extent(2));
  if (batch * n == 0 || s.head_dim == 0) { return; }
  PQKV_EXPECTS(indices.data_handle() != nullptr, where, "indices.data_handle() is null");
  PQKV_EXPECTS(params.blocks_per_sm > 0 && params.blocks_per_sm <= 64, where, "params.blocks_per_sm=",
               params.blocks_per_sm, " is outside [1, 64]");

  auto const layer_off = layer * s.sequences * s.kv_heads * s.capacity * s.head_dim;
  pqkv::detail::gather_gpu::gather_args a{};
  a.k_src = reinterpret_cast<std::byte const*>(store.keys + layer_off);
  a.v_src = reinterpret_cast<std::byte const*>(store.values + layer_off);
  a.committed = store.committed + layer * s.sequences;
  a.src_index = indices.data_handle();
  a.dst_index = has_dst ? dst_rows.data_handle() : nullptr;
  a.row_counts = row_counts.empty() ? nullptr : row_counts.data();
  a.k_dst = reinterpret_cast<std::byte*>(k_out.data_handle());
  a.v_dst = reinterpret_cast<std::byte*>(v_out.data_handle());
  a.rejected = rejected;
  a.capacity = s.capacity;
  a.dst_rows = k_out.extent(2);
  a.n = n;
  a.rows = batch * s.kv_heads;
  a.batch = static_cast<int>(batch);
  a.kv_heads = static_cast<int>(s.kv_heads);
  pqkv::detail::gather_gpu::launch_gather(a, static_cast<std::size_t>(s.head_dim) * sizeof(T),
                                          pqkv::detail::gather_gpu::device_sms() * params.blocks_per_sm, params.load, stream);
}

/// Zero-copy gather into [batch, kv_heads, n, head_dim] outputs (destination row = j).
template <class T>
void gather(kv_store_ref<T> const& store, index_t layer, view<std::int32_t const, 3> indices, view<T, 4> k_out,
            view<T, 4> v_out, std::int32_t* rejected, cudaStream_t stream, gather_params const& params = {})
{
  gather(store, layer, indices, view<std::int32_t const, 3>{}, {}, k_out, v_out, rejected, stream, params);
}

/// The copy-engine path (see the file comment): host indices, consecutive
/// rows merged into one copy, one `cudaMemcpyBatchAsync` per call (a loop of
/// `cudaMemcpyAsync` where the driver lacks it). Keeps its host scratch
/// between calls. Same contract as `gather`, except that entries past the
/// store's host-side `size` throw instead of being counted.
template <class T>
class copy_engine_gather {
 public:
  /// @param indices [batch, kv_heads, n] on the host, -1 padded
  /// @param k_out   [batch, kv_heads, >= n, head_dim] device
  void operator()(kv_store<T> const& store, index_t layer, view<std::int32_t const, 3> indices, view<T, 4> k_out,
                  view<T, 4> v_out, cudaStream_t stream)
  {
    constexpr char const* where = "gpu::copy_engine_gather";
    auto const& s = store.shape();
    PQKV_EXPECTS(layer >= 0 && layer < s.layers, where, "layer=", layer, " is outside [0, ", s.layers, ")");
    index_t const batch = indices.extent(0), n = indices.extent(2);
    PQKV_EXPECTS(batch <= s.sequences, where, "indices.extent(0)=", batch, " exceeds the store's sequences=",
                 s.sequences);
    PQKV_EXPECTS(indices.extent(1) == s.kv_heads, where, "indices.extent(1)=", indices.extent(1),
                 ", store kv_heads=", s.kv_heads);
    pqkv::detail::gather_gpu::check_out<T>(k_out, batch, s.kv_heads, n, s.head_dim, "k_out", where);
    pqkv::detail::gather_gpu::check_out<T>(v_out, batch, s.kv_heads, n, s.head_dim, "v_out", where);
    if (batch * n == 0) { return; }
    PQKV_EXPECTS(indices.data_handle() != nullptr, where, "indices.data_handle() is null");
    std::size_t const row = store.row_bytes();
    dst_.clear();
    src_.clear();
    sizes_.clear();
    for (index_t b = 0; b < batch; ++b) {
      index_t const size = store.size(layer, b);
      for (index_t h = 0; h < s.kv_heads; ++h) {
        index_t const head = ((layer * s.sequences + b) * s.kv_heads + h) * s.capacity;
        for (int kv = 0; kv < 2; ++kv) {
          T const* base = (kv == 0 ? store.host_keys() : store.host_values()) + head * s.head_dim;
          T* out = (kv == 0 ? k_out : v_out).data_handle() + (b * s.kv_heads + h) * k_out.extent(2) * s.head_dim;
          index_t j = 0;
          while (j < n) {
            std::int32_t const first = indices(b, h, j);
            PQKV_EXPECTS(first < size, where, "indices(", b, ", ", h, ", ", j, ")=", first,
                         " is not below the store's size=", size);
            if (first < 0) {
              ++j;
              continue;
            }
            index_t run = 1;
            while (j + run < n && indices(b, h, j + run) == first + run && first + run < size) { ++run; }
            dst_.push_back(out + j * s.head_dim);
            src_.push_back(base + index_t{first} * s.head_dim);
            sizes_.push_back(static_cast<std::size_t>(run) * row);
            j += run;
          }
        }
      }
    }
    if (dst_.empty()) { return; }
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    std::size_t attr_index = 0;
    cudaError_t const status =
      cudaMemcpyBatchAsync(dst_.data(), src_.data(), sizes_.data(), dst_.size(), &attr, &attr_index, 1, stream);
    if (status == cudaErrorNotSupported || status == cudaErrorInvalidValue) {
      cudaGetLastError();
      for (std::size_t i = 0; i < dst_.size(); ++i) {
        PQKV_CUDA_TRY(cudaMemcpyAsync(dst_[i], src_[i], sizes_[i], cudaMemcpyHostToDevice, stream));
      }
      return;
    }
    PQKV_CUDA_TRY(status);
  }

  /// Copies (runs) the latest call issued.
  [[nodiscard]] std::size_t copies() const noexcept { return dst_.size(); }

 private:
  std::vector<void*> dst_;
  std::vector<void const*> src_;
  std::vector<std::size_t> sizes_;
};

}  // namespace pqkv::gpu
