// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::kv_store<T>`: the pinned host store of every layer's K and
/// V, appended asynchronously from GPU buffers and read by the zero-copy
/// gather (offload/gather.cuh) and the GPU cache (cache/gpu_cache.cuh).
///
/// Layout (row-major, one array for K and one for V):
///   [layers, sequences, kv_heads, capacity, head_dim]  T = float, __half,
///   __nv_bfloat16 or __nv_fp8_e4m3
/// `sequences` = 1 gives the [layers, kv_heads, capacity, head_dim] store of
/// one request; a batch of b sequences gathers with selections [b, kv_heads, k].
///
/// Memory: `cudaHostAlloc` with the portable and mapped flags (every device
/// context may use it; kernels read it through its mapped address). On a host
/// with several NUMA nodes and `numa_policy::automatic`, the pages are instead
/// mapped by the store, bound to the NUMA node nearest the current device
/// (`cudaDevAttrHostNumaId`) and then pinned with `cudaHostRegister` (portable,
/// mapped), so that PCIe reads do not cross the socket link.
///
/// Appends and readiness. `append(layer, seq, keys, values, stream)` enqueues,
/// on the caller's copy stream, the device-to-host copies of the new rows at the
/// end of (layer, seq), then raises that sequence's *committed* row count in
/// device memory, then records an event. Every reader is safe without extra
/// synchronization: gathers read the committed count on the device and skip
/// (and count as rejected) any index at or above it, so a gather racing with an
/// append on another stream sees each row either complete or not at all, never
/// half-written. To be sure that the rows of an append *are* visible, order
/// the reader after the append's event (`wait(stream)` or the returned event).
/// The host-side size (`size(layer, seq)`) counts rows enqueued, committed or
/// not. Rows are append-only until `truncate` or `reset`, which lower the
/// committed count (stream-ordered) before later appends rewrite the rows.
///
/// Graph-capturable appends. `append_at_committed` reads the position on the
/// device (the committed count when the call runs), copies the rows from
/// device memory into the mapped pages with a kernel and raises the count, so
/// a captured decode step appends at the new end on every replay. A call that
/// would pass `capacity` writes nothing and raises the device counter
/// `overflows()`. The host does not see these rows: a (layer, seq) appended
/// this way refuses the host-positioned `append` and `size` until `truncate`
/// or `reset` (read `committed()` instead).
///
/// Errors: an append past `capacity`, a wrong view shape or dtype size, a null
/// pointer or a layer / sequence out of range throws `pqkv::error` before any
/// copy is enqueued.
///
/// Devices: the pages are portable, but the committed counts and the events
/// belong to the device current at construction (`device()`); appends,
/// truncates, resets and `ref()` / `committed()` from another device throw.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/gather_kernels.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#if defined(__linux__)
#  include <sys/mman.h>
#  include <sys/syscall.h>
#  include <unistd.h>

#  include <filesystem>
#endif

namespace pqkv::gpu {

/// Shape of a `kv_store`.
struct kv_store_shape {
  index_t layers = 1;
  index_t sequences = 1;
  index_t kv_heads = 8;
  index_t capacity = 0;   ///< rows (tokens) per (layer, sequence, head)
  index_t head_dim = 128;

  /// Elements of one of K or V.
  [[nodiscard]] index_t elements() const noexcept { return layers * sequences * kv_heads * capacity * head_dim; }

  /// Throws `pqkv::error` naming the first field out of range.
  void validate(char const* where = "kv_store_shape") const
  {
    PQKV_EXPECTS(layers > 0, where, "shape.layers=", layers, " must be positive");
    PQKV_EXPECTS(sequences > 0, where, "shape.sequences=", sequences, " must be positive");
    PQKV_EXPECTS(kv_heads > 0, where, "shape.kv_heads=", kv_heads, " must be positive");
    PQKV_EXPECTS(capacity > 0 && capacity <= index_t{std::numeric_limits<std::int32_t>::max()}, where,
                 "shape.capacity=", capacity, " must be in [1, 2^31 - 1]");
    PQKV_EXPECTS(head_dim > 0, where, "shape.head_dim=", head_dim, " must be positive");
  }
};

/// Where the store's pages go.
enum class numa_policy : bool {
  automatic,  ///< bind to the device's nearest node when the host has several
  off,        ///< plain `cudaHostAlloc`
};

/// Device-side handle of a store: mapped addresses and the committed counts.
/// Trivially copyable; valid while the store lives, and on the store's
/// device only (the committed counts are that device's memory).
template <class T>
struct kv_store_ref {
  T const* keys = nullptr;               // mapped [layers, sequences, kv_heads, capacity, head_dim]
  T const* values = nullptr;             // same
  std::int32_t const* committed = nullptr;  // device [layers, sequences]
  kv_store_shape shape{};
};

}  // namespace pqkv::gpu

namespace pqkv::detail {

#if defined(__linux__)
/// NUMA nodes of the host, 1 when unknown.
inline int host_numa_nodes()
{
  std::error_code ec;
  int nodes = 0;
  for (auto const& e : std::filesystem::directory_iterator("/sys/devices/system/node", ec)) {
    auto const name = e.path().filename().string();
    if (name.size() > 4 && name.compare(0, 4, "node") == 0 && name[4] >= '0' && name[4] <= '9') { ++nodes; }
  }
  return nodes > 0 ? nodes : 1;
}
#endif

/// Pinned, portable, mapped host pages; NUMA-bound when asked and possible.
class pinned_pages {
 public:
  pinned_pages() = default;
  pinned_pages(std::size_t bytes, gpu::numa_policy numa) : bytes_{bytes}
  {
    if (bytes == 0) { return; }
#if defined(__linux__)
    int device = 0, node = -1;
    PQKV_CUDA_TRY(cudaGetDevice(&device));
    if (numa == gpu::numa_policy::automatic && host_numa_nodes() > 1 &&
        cudaDeviceGetAttribute(&node, cudaDevAttrHostNumaId, device) == cudaSuccess && node >= 0 && node < 64) {
      void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p != MAP_FAILED) {
        unsigned long mask = 1ul << node;  // MPOL_PREFERRED = 1: fall back to other nodes when full
        long const bound = ::syscall(SYS_mbind, p, bytes, 1, &mask, sizeof(mask) * 8, 0);
        if (bound == 0 &&
            cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped) == cudaSuccess) {
          data_ = static_cast<std::byte*>(p);
          registered_ = true;
          numa_node_ = node;
          return;
        }
        cudaGetLastError();
        ::munmap(p, bytes);
      }
    }
    cudaGetLastError();  // a failed attribute query is not an error here
#else
    (void)numa;
#endif
    void* p = nullptr;
    PQKV_CUDA_TRY(cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped));
    data_ = static_cast<std::byte*>(p);
  }
  pinned_pages(pinned_pages&& o) noexcept
    : data_{std::exchange(o.data_, nullptr)}, bytes_{std::exchange(o.bytes_, 0)},
      registered_{std::exchange(o.registered_, false)}, numa_node_{std::exchange(o.numa_node_, -1)} {}
  pinned_pages& operator=(pinned_pages&& o) noexcept
  {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      registered_ = std::exchange(o.registered_, false);
      numa_node_ = std::exchange(o.numa_node_, -1);
    }
    return *this;
  }
  pinned_pages(pinned_pages const&) = delete;
  pinned_pages& operator=(pinned_pages const&) = delete;
  ~pinned_pages() { release(); }

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] int numa_node() const noexcept { return numa_node_; }

 private:
  void release() noexcept
  {
    if (data_ == nullptr) { return; }
#if defined(__linux__)
    if (registered_) {
      cudaHostUnregister(data_);
      ::munmap(data_, bytes_);
      data_ = nullptr;
      return;
    }
#endif
    cudaFreeHost(data_);
    data_ = nullptr;
  }
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
  bool registered_ = false;
  int numa_node_ = -1;
};

}  // namespace pqkv::detail

namespace pqkv::gpu {

/// Pinned host store of K and V for every layer (see the file comment).
/// Not copyable; movable. Its host methods are not thread-safe. Lives on the
/// device current at construction; calls from another device throw.
template <class T>
class kv_store {
 public:
  /// Allocates K and V pinned (contents uninitialized), the committed counts
  /// (zero) and a small ring of events, on the current device.
  explicit kv_store(kv_store_shape const& shape, numa_policy numa = numa_policy::automatic) : shape_{shape}
  {
    shape_.validate("kv_store");
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    auto const bytes = static_cast<std::size_t>(shape_.elements()) * sizeof(T);
    keys_ = pqkv::detail::pinned_pages(bytes, numa);
    values_ = pqkv::detail::pinned_pages(bytes, numa);
    PQKV_CUDA_TRY(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_keys_), keys_.data(), 0));
    PQKV_CUDA_TRY(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_values_), values_.data(), 0));
    auto const counts = static_cast<std::size_t>(shape_.layers * shape_.sequences);
    PQKV_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&committed_), counts * sizeof(std::int32_t)));
    PQKV_CUDA_TRY(cudaMemset(committed_, 0, counts * sizeof(std::int32_t)));
    PQKV_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&overflows_), sizeof(std::int32_t)));
    PQKV_CUDA_TRY(cudaMemset(overflows_, 0, sizeof(std::int32_t)));
    // The memset runs on the legacy stream; appends may come on non-blocking streams.
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
    sizes_.assign(counts, 0);
    device_side_.assign(counts, 0);
    for (auto& e : events_) { PQKV_CUDA_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming)); }
  }
  kv_store(kv_store&& o) noexcept
    : shape_{o.shape_}, device_{o.device_}, keys_{std::move(o.keys_)}, values_{std::move(o.values_)},
      dev_keys_{std::exchange(o.dev_keys_, nullptr)}, dev_values_{std::exchange(o.dev_values_, nullptr)},
      committed_{std::exchange(o.committed_, nullptr)}, overflows_{std::exchange(o.overflows_, nullptr)},
      sizes_{std::move(o.sizes_)}, device_side_{std::move(o.device_side_)}, events_{o.events_},
      next_event_{o.next_event_}, last_event_{std::exchange(o.last_event_, nullptr)}
  {
    o.events_.fill(nullptr);
  }
  kv_store& operator=(kv_store&&) = delete;
  kv_store(kv_store const&) = delete;
  kv_store& operator=(kv_store const&) = delete;
  ~kv_store()
  {
    // Copies may still target the pages: let them land before they go.
    if (last_event_ != nullptr) { cudaEventSynchronize(last_event_); }
    for (auto e : events_) {
      if (e != nullptr) { cudaEventDestroy(e); }
    }
    if (committed_ != nullptr) { cudaFree(committed_); }
    if (overflows_ != nullptr) { cudaFree(overflows_); }
  }

  [[nodiscard]] kv_store_shape const& shape() const noexcept { return shape_; }
  /// The device the store was built on: its committed counts and events live there.
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Bytes of one row (head_dim elements).
  [[nodiscard]] std::size_t row_bytes() const noexcept { return static_cast<std::size_t>(shape_.head_dim) * sizeof(T); }
  /// NUMA node the pages are bound to, -1 when not bound.
  [[nodiscard]] int numa_node() const noexcept { return keys_.numa_node(); }
  /// Host addresses of K and V, [layers, sequences, kv_heads, capacity, head_dim].
  [[nodiscard]] T* host_keys() const noexcept { return reinterpret_cast<T*>(keys_.data()); }
  [[nodiscard]] T* host_values() const noexcept { return reinterpret_cast<T*>(values_.data()); }
  /// Device-side handle (mapped addresses, committed counts), valid on
  /// `device()` only; throws when called from another device.
  [[nodiscard]] kv_store_ref<T> ref() const
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "kv_store.ref");
    return {dev_keys_, dev_values_, committed_, shape_};
  }
  /// Device array [layers, sequences] of committed row counts, memory of
  /// `device()`; throws when called from another device.
  [[nodiscard]] std::int32_t const* committed() const
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "kv_store.committed");
    return committed_;
  }
  /// Device counter of `append_at_committed` calls that would have passed
  /// `capacity` (they wrote nothing); zeroed by `reset`.
  [[nodiscard]] std::int32_t const* overflows() const
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "kv_store.overflows");
    return overflows_;
  }
  /// Rows enqueued for (layer, seq), committed or not; throws for a
  /// (layer, seq) appended on the device (see the file comment).
  [[nodiscard]] index_t size(index_t layer, index_t seq = 0) const
  {
    check_slot(layer, seq, "kv_store.size");
    check_host_side(layer, seq, "kv_store.size");
    return sizes_[static_cast<std::size_t>(layer * shape_.sequences + seq)];
  }
  /// The event recorded by the latest append, truncate or reset (null before any).
  [[nodiscard]] cudaEvent_t last_event() const noexcept { return last_event_; }

  /// Appends rows [kv_heads, tokens, head_dim] of K and V (device or host
  /// memory; any strides with a unit innermost stride) at the end of
  /// (layer, seq), on `stream`; returns the event that completes when they are
  /// committed (it is reused after `event_ring` later appends).
  cudaEvent_t append(index_t layer, index_t seq, kv_view<T const> keys, kv_view<T const> values, cudaStream_t stream)
  {
    constexpr char const* where = "kv_store.append";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    check_slot(layer, seq, where);
    check_host_side(layer, seq, where);
    check_views(keys, values, where);
    index_t const tokens = keys.extent(1);
    auto const at = static_cast<std::size_t>(layer * shape_.sequences + seq);
    index_t const start = sizes_[at];
    PQKV_EXPECTS(tokens <= shape_.capacity - start, where, "appending ", tokens, " rows to (layer=", layer,
                 ", seq=", seq, ") holding ", start, " exceeds capacity=", shape_.capacity);
    if (tokens == 0) { return last_event_; }
    copy_rows(host_keys(), layer, seq, start, keys, stream);
    copy_rows(host_values(), layer, seq, start, values, stream);
    sizes_[at] = start + tokens;
    pqkv::detail::gather_gpu::launch_set_committed(committed_ + at, static_cast<std::int32_t>(start + tokens), stream);
    return record(stream);
  }

  /// Appends rows [kv_heads, tokens, head_dim] of K and V (device memory,
  /// unit innermost stride) at (layer, seq)'s committed count as the device
  /// holds it when the call runs, then raises the count by `tokens`, all on
  /// `stream`: capturable, and a replay appends at the new end. Past
  /// `capacity` it writes nothing and raises `overflows()`. Returns the
  /// event that completes when the rows are committed.
  cudaEvent_t append_at_committed(index_t layer, index_t seq, kv_view<T const> keys, kv_view<T const> values,
                                  cudaStream_t stream)
  {
    constexpr char const* where = "kv_store.append_at_committed";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    check_slot(layer, seq, where);
    check_views(keys, values, where);
    PQKV_EXPECTS(keys.stride(0) == values.stride(0) && keys.stride(1) == values.stride(1), where,
                 "keys and values strides differ: (", keys.stride(0), ", ", keys.stride(1), ") vs (", values.stride(0),
                 ", ", values.stride(1), ")");
    index_t const tokens = keys.extent(1);
    PQKV_EXPECTS(tokens <= shape_.capacity, where, "tokens=", tokens, " exceeds capacity=", shape_.capacity);
    auto const at = static_cast<std::size_t>(layer * shape_.sequences + seq);
    device_side_[at] = 1;
    if (tokens == 0) { return last_event_; }
    pqkv::detail::gpu_check::expect_device_pointer(keys.data_handle(), where, "keys.data_handle()");
    pqkv::detail::gpu_check::expect_device_pointer(values.data_handle(), where, "values.data_handle()");
    auto const rb = static_cast<std::int64_t>(row_bytes());
    auto const slot_offset = static_cast<std::int64_t>(at) * shape_.kv_heads * shape_.capacity * rb;
    pqkv::detail::gather_gpu::append_args a{};
    a.k_src = reinterpret_cast<std::byte const*>(keys.data_handle());
    a.v_src = reinterpret_cast<std::byte const*>(values.data_handle());
    a.src_head_stride = static_cast<std::int64_t>(keys.stride(0)) * static_cast<std::int64_t>(sizeof(T));
    a.src_row_stride = static_cast<std::int64_t>(keys.stride(1)) * static_cast<std::int64_t>(sizeof(T));
    a.k_dst = reinterpret_cast<std::byte*>(dev_keys_) + slot_offset;
    a.v_dst = reinterpret_cast<std::byte*>(dev_values_) + slot_offset;
    a.capacity = shape_.capacity;
    a.row_bytes = rb;
    a.committed = committed_ + at;
    a.overflow = overflows_;
    a.kv_heads = static_cast<int>(shape_.kv_heads);
    a.tokens = static_cast<int>(tokens);
    pqkv::detail::gather_gpu::launch_append_at_committed(a, stream);
    return record(stream);
  }

  /// Shrinks (layer, seq) to `tokens` rows: the committed count drops on
  /// `stream` before any later append's copies, so no gather reads the old rows
  /// past it.
  cudaEvent_t truncate(index_t layer, index_t seq, index_t tokens, cudaStream_t stream)
  {
    constexpr char const* where = "kv_store.truncate";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    check_slot(layer, seq, where);
    auto const at = static_cast<std::size_t>(layer * shape_.sequences + seq);
    // A (layer, seq) appended on the device: the host cannot check against its size.
    index_t const bound = device_side_[at] != 0 ? shape_.capacity : sizes_[at];
    PQKV_EXPECTS(tokens >= 0 && tokens <= bound, where, "tokens=", tokens, " is outside [0, ", bound, "]");
    sizes_[at] = tokens;
    device_side_[at] = 0;
    pqkv::detail::gather_gpu::launch_set_committed(committed_ + at, static_cast<std::int32_t>(tokens), stream);
    return record(stream);
  }

  /// Empties every (layer, sequence) on `stream`.
  cudaEvent_t reset(cudaStream_t stream)
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "kv_store.reset");
    std::fill(sizes_.begin(), sizes_.end(), index_t{0});
    std::fill(device_side_.begin(), device_side_.end(), std::uint8_t{0});
    PQKV_CUDA_TRY(cudaMemsetAsync(committed_, 0, sizes_.size() * sizeof(std::int32_t), stream));
    PQKV_CUDA_TRY(cudaMemsetAsync(overflows_, 0, sizeof(std::int32_t), stream));
    return record(stream);
  }

  /// Makes `consumer` wait for the latest append, truncate or reset (a no-op
  /// before any); capturable.
  void wait(cudaStream_t consumer) const
  {
    if (last_event_ != nullptr) { PQKV_CUDA_TRY(cudaStreamWaitEvent(consumer, last_event_, 0)); }
  }

  /// Events in the ring.
  static constexpr std::size_t event_ring = 8;

 private:
  void check_slot(index_t layer, index_t seq, char const* where) const
  {
    PQKV_EXPECTS(layer >= 0 && layer < shape_.layers, where, "layer=", layer, " is outside [0, ", shape_.layers, ")");
    PQKV_EXPECTS(seq >= 0 && seq < shape_.sequences, where, "seq=", seq, " is outside [0, ", shape_.sequences, ")");
  }

  void check_host_side(index_t layer, index_t seq, char const* where) const
  {
    PQKV_EXPECTS(device_side_[static_cast<std::size_t>(layer * shape_.sequences + seq)] == 0, where, "(layer=", layer,
                 ", seq=", seq, ") is appended on the device (append_at_committed): its size lives in committed(); "
                 "truncate or reset it first");
  }

  /// Both appends: K and V rows of the store's shape, as many of each.
  void check_views(kv_view<T const> keys, kv_view<T const> values, char const* where) const
  {
    check_rows(keys, "keys", where);
    check_rows(values, "values", where);
    PQKV_EXPECTS(keys.extent(1) == values.extent(1), where, "keys.extent(1)=", keys.extent(1),
                 ", values.extent(1)=", values.extent(1));
  }

  void check_rows(kv_view<T const> v, char const* name, char const* where) const
  {
    PQKV_EXPECTS(v.extent(0) == shape_.kv_heads, where, name, ".extent(0)=", v.extent(0), ", shape.kv_heads=",
                 shape_.kv_heads);
    PQKV_EXPECTS(v.extent(2) == shape_.head_dim, where, name, ".extent(2)=", v.extent(2), ", shape.head_dim=",
                 shape_.head_dim);
    if (v.extent(1) == 0) { return; }
    PQKV_EXPECTS(v.data_handle() != nullptr, where, name, ".data_handle() is null");
    PQKV_EXPECTS(v.stride(2) == 1 || shape_.head_dim == 1, where, name, ".stride(2)=", v.stride(2),
                 " must be 1 (rows are copied as contiguous runs)");
  }

  // One 2D copy for all heads when each head's rows are contiguous, else one per head.
  void copy_rows(T* dst_base, index_t layer, index_t seq, index_t start, kv_view<T const> src, cudaStream_t stream)
  {
    auto const d = static_cast<std::size_t>(shape_.head_dim);
    auto const head_pitch = static_cast<std::size_t>(shape_.capacity) * d * sizeof(T);
    T* dst = dst_base + ((layer * shape_.sequences + seq) * shape_.kv_heads * shape_.capacity + start) * shape_.head_dim;
    auto const tokens = static_cast<std::size_t>(src.extent(1));
    bool const rows_packed = src.extent(1) == 1 || src.stride(1) == shape_.head_dim;
    if (rows_packed && shape_.kv_heads == 1) {
      PQKV_CUDA_TRY(cudaMemcpyAsync(dst, src.data_handle(), tokens * d * sizeof(T), cudaMemcpyDefault, stream));
      return;
    }
    if (rows_packed) {
      PQKV_CUDA_TRY(cudaMemcpy2DAsync(dst, head_pitch, src.data_handle(),
                                      static_cast<std::size_t>(src.stride(0)) * sizeof(T), tokens * d * sizeof(T),
                                      static_cast<std::size_t>(shape_.kv_heads), cudaMemcpyDefault, stream));
      return;
    }
    for (index_t h = 0; h < shape_.kv_heads; ++h) {
      PQKV_CUDA_TRY(cudaMemcpy2DAsync(reinterpret_cast<std::byte*>(dst) + static_cast<std::size_t>(h) * head_pitch,
                                      d * sizeof(T), src.data_handle() + h * src.stride(0),
                                      static_cast<std::size_t>(src.stride(1)) * sizeof(T), d * sizeof(T), tokens,
                                      cudaMemcpyDefault, stream));
    }
  }

  cudaEvent_t record(cudaStream_t stream)
  {
    cudaEvent_t const e = events_[next_event_];
    next_event_ = (next_event_ + 1) % event_ring;
    PQKV_CUDA_TRY(cudaEventRecord(e, stream));
    last_event_ = e;
    return e;
  }

  kv_store_shape shape_;
  int device_ = 0;                      // current at construction: owns committed_ and the events
  pqkv::detail::pinned_pages keys_, values_;
  T* dev_keys_ = nullptr;
  T* dev_values_ = nullptr;
  std::int32_t* committed_ = nullptr;   // device [layers, sequences]
  std::int32_t* overflows_ = nullptr;   // device: append_at_committed calls past capacity
  std::vector<index_t> sizes_;          // host [layers, sequences]: rows enqueued
  std::vector<std::uint8_t> device_side_;  // host [layers, sequences]: appended on the device since the last truncate/reset
  std::array<cudaEvent_t, event_ring> events_{};
  std::size_t next_event_ = 0;
  cudaEvent_t last_event_ = nullptr;
};

}  // namespace pqkv::gpu
