// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The GPU caches of selected K/V rows: `gpu::slot_table<Policy>`, the
/// token-row cache of every (layer, sequence, KV head) under LRU, LFU, FIFO or
/// a user's policy, and `gpu::block_lfu_cache`, PQCache's per-layer cache of
/// 128-token blocks. Each makes, on the device, the same decisions as its CPU
/// model (`cpu::slot_table`, cache/slot_table.hpp; `cpu::block_lfu_cache`,
/// cache/block_lfu.hpp), decision for decision on the same trace.
///
/// slot_table: one call per layer step, `step(layer, keys, ...)`:
///  - one kernel, one CUDA block per row (sequence b, head h) of the layer,
///    runs `cpu::slot_table::access` on that row with step = the row's call
///    count since `reset` (1, 2, ...): (1) hits on the map as it was, each
///    distinct hit slot pinned and `on_hit` once; (2) distinct misses in
///    first-occurrence order; (3) the lowest free slots to the first misses;
///    (4) the rest get the policy's victims among unpinned slots, in the order
///    the CPU model would ask for them (ties: lower score, older stamp, lower
///    slot), or are bypassed (slot -1) when every slot is pinned; (5) every
///    occurrence gets its key's slot;
///  - then (in `step`) one gather kernel copies the inserted rows from the
///    pinned store into their hot slots; hits cost no copy.
/// The attention kernel reads every selected row from one list: `slots`
/// [batch, kv_heads, n] (hot row, -1 for padding or a bypassed miss) or, if
/// asked, row pointers [batch, kv_heads, n] to the hot row, to the mapped
/// store row of a bypassed miss (zero-copy), or null for padding.
///
/// Differences from the CPU model's host-side checks, since keys live in
/// device memory: a key >= key_bound is not thrown on but treated as padding
/// and counted (`step_counters::bad_keys`); the step is the row's own call
/// counter (the CPU model is called with step = 1, 2, ... after a reset);
/// `newest` keys are read per sequence from device memory and ignored without
/// `reserve::newest`. An inserted key must be committed in the store (the
/// scorer selects only tokens below the sequence length); one that is not is
/// counted by the gather's `rejected` counter and its hot row is not written.
///
/// Memory: the table owns its state on the device (per layer and row: a
/// key_bound-sized key -> slot map, and per slot its key, score, stamp and
/// pin), allocated and reset at construction; a call allocates nothing, never
/// synchronizes, and can be captured in a CUDA graph. The hot K/V buffers are
/// the caller's. Calls of one table must be stream-ordered (they share the
/// per-call outputs, valid until the next call). Each table and cache lives
/// on the device current at construction; calls from another device throw
/// `pqkv::error` (multi-GPU engines build one per device).

#include <pqkv/cache/block_lfu.hpp>
#include <pqkv/cache/gpu_policies.cuh>
#include <pqkv/cache/policy.hpp>
#include <pqkv/cache/slot_table.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/gpu_cache_kernels.cuh>
#include <pqkv/offload/gather.cuh>
#include <pqkv/offload/kv_store.cuh>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

namespace pqkv::gpu {

/// Shape of a `gpu::slot_table`.
struct slot_table_shape {
  index_t layers = 1;
  index_t batch = 1;               ///< sequences (the store's sequences)
  index_t kv_heads = 8;
  std::uint32_t capacity = 4096;   ///< hot rows per (layer, sequence, head), the reserved one included
  std::int32_t key_bound = 0;      ///< keys are token positions in [0, key_bound) (the store's capacity)
  index_t max_keys = 2048;         ///< selection entries per row and call
  cpu::reserve reserved = cpu::reserve::none;
  /// Tuning: the most managed slots whose eviction keys a step keeps in shared
  /// memory (-1: as many as the device's shared memory holds); a row with
  /// more slots keeps them in a global scratch the table owns.
  std::int32_t max_shared_key_slots = -1;

  void validate(char const* where = "slot_table_shape") const
  {
    PQKV_EXPECTS(layers > 0 && batch > 0 && kv_heads > 0, where, "layers=", layers, ", batch=", batch,
                 ", kv_heads=", kv_heads, " must be positive");
    PQKV_EXPECTS(batch * kv_heads <= 65535 * 32, where, "batch * kv_heads=", batch * kv_heads, " is too large");
    PQKV_EXPECTS(capacity > 0 && capacity <= (1u << 24), where, "capacity=", capacity, " is outside [1, 2^24]");
    PQKV_EXPECTS(reserved == cpu::reserve::none || capacity >= 2, where, "capacity=", capacity,
                 " leaves no slot besides the one reserved for the newest token");
    PQKV_EXPECTS(key_bound > 0, where, "key_bound=", key_bound, " must be positive");
    PQKV_EXPECTS(max_keys > 0 && max_keys < index_t{std::numeric_limits<std::int32_t>::max()} / 2, where,
                 "max_keys=", max_keys, " is outside [1, 2^30)");
  }
  [[nodiscard]] std::uint32_t managed() const noexcept
  {
    return capacity - (reserved == cpu::reserve::newest ? 1u : 0u);
  }
};

/// Device pointers to what the latest call decided, per row r = b * kv_heads + h
/// (valid until the next call of the same table).
struct slot_step_ref {
  std::uint8_t const* hit;            ///< [rows, n] 1 where the key was resident before the call
  std::int32_t const* ins_key;        ///< [rows, n] inserted keys, first-occurrence order
  std::int32_t const* ins_slot;       ///< [rows, n] their slots
  std::int32_t const* ins_evicted;    ///< [rows, n] the keys they evicted, -1 for a free slot
  std::int32_t const* ins_count;      ///< [rows] inserts
  std::int32_t const* counters;       ///< [rows, 4] hits, misses (occurrences), bypassed, bad keys
  index_t n;                          ///< entries per row of the latest call
};

/// Row pointers the attention kernel may read instead of slots: [batch,
/// kv_heads, n] device arrays the caller owns.
template <class T>
struct row_pointers {
  view<T const*, 3> keys{};
  view<T const*, 3> values{};
};

/// The GPU token-row cache (see the file comment). Lives on the device
/// current at construction; calls from another device throw.
template <GpuCachePolicy Policy = cache::lru>
class slot_table {
 public:
  explicit slot_table(slot_table_shape const& shape, Policy policy = Policy{}) : shape_{shape}, policy_{policy}
  {
    shape_.validate("gpu::slot_table");
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    auto const rows = static_cast<std::size_t>(shape_.batch * shape_.kv_heads);
    auto const all = rows * static_cast<std::size_t>(shape_.layers);
    auto const managed = static_cast<std::size_t>(shape_.managed());
    auto const n = static_cast<std::size_t>(shape_.max_keys);
    slot_of_ = device_buffer<std::int32_t>(all * static_cast<std::size_t>(shape_.key_bound));
    key_of_ = device_buffer<std::int32_t>(all * managed);
    score_ = device_buffer<float>(all * managed);
    stamp_ = device_buffer<std::uint32_t>(all * managed);
    pinned_ = device_buffer<std::uint32_t>(all * managed);
    steps_ = device_buffer<std::uint32_t>(all);
    used_ = device_buffer<std::uint32_t>(all);
    hit_ = device_buffer<std::uint8_t>(rows * n);
    ins_key_ = device_buffer<std::int32_t>(rows * n);
    ins_slot_ = device_buffer<std::int32_t>(rows * n);
    ins_evicted_ = device_buffer<std::int32_t>(rows * n);
    ins_count_ = device_buffer<std::int32_t>(rows);
    counters_ = device_buffer<std::int32_t>(rows * 4);
    sel_key_ = device_buffer<unsigned long long>(2 * rows * managed);
    sel_idx_ = device_buffer<std::int32_t>(2 * rows * managed);
    smem_key_slots_ = pqkv::detail::cache_gpu::prepare_table_step<Policy>();
    if (shape_.max_shared_key_slots >= 0 && shape_.max_shared_key_slots < smem_key_slots_) {
      smem_key_slots_ = shape_.max_shared_key_slots;
    }
    if (managed > static_cast<std::size_t>(smem_key_slots_)) {
      key_cache_ = device_buffer<unsigned long long>(rows * managed);
    }
    PQKV_CUDA_TRY(cudaMemset(ins_count_.data(), 0, ins_count_.size_bytes()));
    PQKV_CUDA_TRY(cudaMemset(counters_.data(), 0, counters_.size_bytes()));
    reset(nullptr);
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
  }

  [[nodiscard]] slot_table_shape const& shape() const noexcept { return shape_; }
  [[nodiscard]] Policy const& policy() const noexcept { return policy_; }
  /// The device the table was built on; its state and calls live there.
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Slots the policy manages per row.
  [[nodiscard]] std::uint32_t managed_slots() const noexcept { return shape_.managed(); }
  /// The reserved slot, -1 without `reserve::newest`.
  [[nodiscard]] std::int32_t reserved_slot() const noexcept
  {
    return shape_.reserved == cpu::reserve::newest ? static_cast<std::int32_t>(shape_.managed()) : -1;
  }
  /// Device bytes of the table's state and per-call outputs.
  [[nodiscard]] std::size_t state_bytes() const noexcept
  {
    return slot_of_.size_bytes() + key_of_.size_bytes() + score_.size_bytes() + stamp_.size_bytes() +
           pinned_.size_bytes() + steps_.size_bytes() + used_.size_bytes() + hit_.size_bytes() + ins_key_.size_bytes() +
           ins_slot_.size_bytes() + ins_evicted_.size_bytes() + ins_count_.size_bytes() + counters_.size_bytes() +
           sel_key_.size_bytes() + sel_idx_.size_bytes() + key_cache_.size_bytes();
  }
  /// What the latest call decided (device pointers).
  [[nodiscard]] slot_step_ref last() const noexcept
  {
    return {hit_.data(), ins_key_.data(), ins_slot_.data(), ins_evicted_.data(), ins_count_.data(), counters_.data(),
            last_n_};
  }
  /// Device array [layers, batch * kv_heads, key_bound]: the key -> slot maps.
  [[nodiscard]] std::int32_t const* slot_map() const noexcept { return slot_of_.data(); }
  /// Device arrays [layers, batch * kv_heads, managed]: key, score, stamp of each slot.
  [[nodiscard]] std::int32_t const* slot_keys() const noexcept { return key_of_.data(); }
  [[nodiscard]] float const* slot_scores() const noexcept { return score_.data(); }
  [[nodiscard]] std::uint32_t const* slot_stamps() const noexcept { return stamp_.data(); }

  /// Lookup, policy update and inserts of one layer step, without copying rows.
  /// @param keys   [batch, kv_heads, n] device, token positions, -1 padded
  /// @param newest [batch] device keys of the reserved slot, or empty
  /// @param slots  [batch, kv_heads, n] device out: hot row of each key, -1 for padding or bypassed
  void access(index_t layer, view<std::int32_t const, 3> keys, std::span<std::int32_t const> newest,
              view<std::int32_t, 3> slots, cudaStream_t stream)
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "gpu::slot_table.access");
    auto a = args(layer, keys, newest, slots, "gpu::slot_table.access");
    if (keys.extent(2) == 0) { return; }
    pqkv::detail::cache_gpu::launch_table_step(a, policy_, static_cast<int>(shape_.batch * shape_.kv_heads), stream);
  }

  /// One layer step: `access`, then the gather of the inserted rows from the
  /// store into the hot buffers. Row pointers are written when given.
  /// @param hot_k    [batch, kv_heads, capacity, head_dim] device, the layer's hot K rows
  /// @param rejected device counter for inserted keys not committed in the store, or null
  template <class T>
  void step(index_t layer, view<std::int32_t const, 3> keys, std::span<std::int32_t const> newest,
            kv_store_ref<T> const& store, view<T, 4> hot_k, view<T, 4> hot_v, view<std::int32_t, 3> slots,
            std::int32_t* rejected, cudaStream_t stream, row_pointers<T> pointers = {})
  {
    constexpr char const* where = "gpu::slot_table.step";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    auto a = args(layer, keys, newest, slots, where);
    check_fetch(store, layer, hot_k, hot_v, where);
    auto const& s = store.shape;
    bool const want_ptrs = pointers.keys.data_handle() != nullptr || pointers.values.data_handle() != nullptr;
    if (want_ptrs) {
      for (auto const* p : {&pointers.keys, &pointers.values}) {
        PQKV_EXPECTS(p->data_handle() != nullptr && p->extent(0) == keys.extent(0) && p->extent(1) == keys.extent(1) &&
                       p->extent(2) == keys.extent(2),
                     where, "row pointer arrays must be non-null and shaped like keys");
      }
      auto const row_bytes = static_cast<std::int64_t>(s.head_dim) * static_cast<std::int64_t>(sizeof(T));
      auto const layer_off = layer * s.sequences * s.kv_heads * s.capacity * s.head_dim;
      a.k_ptr = reinterpret_cast<std::byte const**>(pointers.keys.data_handle());
      a.v_ptr = reinterpret_cast<std::byte const**>(pointers.values.data_handle());
      a.hot_k = reinterpret_cast<std::byte const*>(hot_k.data_handle());
      a.hot_v = reinterpret_cast<std::byte const*>(hot_v.data_handle());
      a.store_k = reinterpret_cast<std::byte const*>(store.keys + layer_off);
      a.store_v = reinterpret_cast<std::byte const*>(store.values + layer_off);
      a.row_bytes = row_bytes;
      a.store_capacity = s.capacity;
      a.capacity = shape_.capacity;
    }
    index_t const n = keys.extent(2);
    if (n == 0) { return; }
    pqkv::detail::cache_gpu::launch_table_step(a, policy_, static_cast<int>(shape_.batch * shape_.kv_heads), stream);
    gather_inserted(store, hot_k, hot_v, rejected, stream);
  }

  /// The gather half of `step`: copies the rows the latest `access` (or
  /// `step`) inserted from the store's layer of that call into the hot
  /// buffers, on `stream`. The stream may differ from the call's (order the
  /// two with an event), so that the fetch overlaps work that needs only the
  /// hits; it must run before the table's next call, which overwrites the
  /// inserts.
  /// @param hot_k    [batch, kv_heads, capacity, head_dim] device, the layer's hot K rows
  /// @param rejected device counter for inserted keys not committed in the store, or null
  template <class T>
  void fetch_inserted(kv_store_ref<T> const& store, view<T, 4> hot_k, view<T, 4> hot_v, std::int32_t* rejected,
                      cudaStream_t stream)
  {
    constexpr char const* where = "gpu::slot_table.fetch_inserted";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    PQKV_EXPECTS(last_layer_ >= 0, where, "no access or step call precedes it");
    check_fetch(store, last_layer_, hot_k, hot_v, where);
    if (last_n_ == 0) { return; }
    gather_inserted(store, hot_k, hot_v, rejected, stream);
  }

  /// Empties every layer (preemption, a new batch), on `stream`.
  void reset(cudaStream_t stream)
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "gpu::slot_table.reset");
    for (index_t l = 0; l < shape_.layers; ++l) { reset(l, stream); }
  }

  /// Empties one layer, on `stream`.
  void reset(index_t layer, cudaStream_t stream)
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "gpu::slot_table.reset");
    PQKV_EXPECTS(layer >= 0 && layer < shape_.layers, "gpu::slot_table.reset", "layer=", layer, " is outside [0, ",
                 shape_.layers, ")");
    pqkv::detail::cache_gpu::launch_table_reset(layer_args(layer), static_cast<int>(shape_.batch * shape_.kv_heads),
                                                stream);
  }

 private:
  pqkv::detail::cache_gpu::table_args layer_args(index_t layer) const
  {
    auto const rows = shape_.batch * shape_.kv_heads;
    auto const managed = static_cast<index_t>(shape_.managed());
    pqkv::detail::cache_gpu::table_args a{};
    a.slot_of = slot_of_.data() + layer * rows * shape_.key_bound;
    a.key_of = key_of_.data() + layer * rows * managed;
    a.score = score_.data() + layer * rows * managed;
    a.stamp = stamp_.data() + layer * rows * managed;
    a.pinned = pinned_.data() + layer * rows * managed;
    a.steps = steps_.data() + layer * rows;
    a.used = used_.data() + layer * rows;
    a.hit = hit_.data();
    a.ins_key = ins_key_.data();
    a.ins_slot = ins_slot_.data();
    a.ins_evicted = ins_evicted_.data();
    a.ins_count = ins_count_.data();
    a.counters = counters_.data();
    a.sel_key = sel_key_.data();
    a.sel_idx = sel_idx_.data();
    a.key_cache = key_cache_.data();
    a.keys_in_smem = managed <= static_cast<index_t>(smem_key_slots_);
    a.key_bound = shape_.key_bound;
    a.managed = static_cast<int>(managed);
    a.kv_heads = static_cast<int>(shape_.kv_heads);
    a.reserved = shape_.reserved == cpu::reserve::newest;
    a.capacity = shape_.capacity;
    return a;
  }

  pqkv::detail::cache_gpu::table_args args(index_t layer, view<std::int32_t const, 3> keys,
                                           std::span<std::int32_t const> newest, view<std::int32_t, 3> slots,
                                           char const* where)
  {
    PQKV_EXPECTS(layer >= 0 && layer < shape_.layers, where, "layer=", layer, " is outside [0, ", shape_.layers, ")");
    PQKV_EXPECTS(keys.extent(0) == shape_.batch && keys.extent(1) == shape_.kv_heads, where, "keys extents (",
                 keys.extent(0), ", ", keys.extent(1), ", ", keys.extent(2), ") differ from (batch, kv_heads)=(",
                 shape_.batch, ", ", shape_.kv_heads, ")");
    PQKV_EXPECTS(keys.extent(2) <= shape_.max_keys, where, "keys.extent(2)=", keys.extent(2),
                 " exceeds shape.max_keys=", shape_.max_keys);
    PQKV_EXPECTS(slots.extent(0) == keys.extent(0) && slots.extent(1) == keys.extent(1) &&
                   slots.extent(2) == keys.extent(2),
                 where, "slots extents (", slots.extent(0), ", ", slots.extent(1), ", ", slots.extent(2),
                 ") differ from keys");
    PQKV_EXPECTS(newest.empty() || static_cast<index_t>(newest.size()) == shape_.batch, where, "newest.size()=",
                 newest.size(), ", batch=", shape_.batch);
    if (keys.extent(2) > 0) {
      PQKV_EXPECTS(keys.data_handle() != nullptr, where, "keys.data_handle() is null");
      PQKV_EXPECTS(slots.data_handle() != nullptr, where, "slots.data_handle() is null");
    }
    auto a = layer_args(layer);
    a.keys = keys.data_handle();
    a.newest = newest.empty() ? nullptr : newest.data();
    a.slots = slots.data_handle();
    a.n = static_cast<int>(keys.extent(2));
    last_n_ = keys.extent(2);
    last_layer_ = layer;
    return a;
  }

  /// Throws unless the store covers the table's rows and keys at `layer`
  /// and the hot buffers are the table's.
  template <class T>
  void check_fetch(kv_store_ref<T> const& store, index_t layer, view<T, 4> const& hot_k, view<T, 4> const& hot_v,
                   char const* where) const
  {
    auto const& s = store.shape;
    PQKV_EXPECTS(store.keys != nullptr && store.values != nullptr && store.committed != nullptr, where,
                 "store is an empty kv_store_ref");
    PQKV_EXPECTS(layer < s.layers, where, "layer=", layer, " is outside the store's layers=", s.layers);
    PQKV_EXPECTS(s.sequences >= shape_.batch && s.kv_heads == shape_.kv_heads, where, "store (sequences=",
                 s.sequences, ", kv_heads=", s.kv_heads, ") does not cover (batch=", shape_.batch, ", kv_heads=",
                 shape_.kv_heads, ")");
    PQKV_EXPECTS(s.capacity >= shape_.key_bound, where, "store capacity=", s.capacity, " < key_bound=",
                 shape_.key_bound);
    for (auto const* hot : {&hot_k, &hot_v}) {
      PQKV_EXPECTS(hot->extent(0) == shape_.batch && hot->extent(1) == shape_.kv_heads &&
                     hot->extent(2) == static_cast<index_t>(shape_.capacity) && hot->extent(3) == s.head_dim,
                   where, "hot buffer extents (", hot->extent(0), ", ", hot->extent(1), ", ", hot->extent(2), ", ",
                   hot->extent(3), ") differ from (batch, kv_heads, capacity, head_dim)=(", shape_.batch, ", ",
                   shape_.kv_heads, ", ", shape_.capacity, ", ", s.head_dim, ")");
      PQKV_EXPECTS(hot->data_handle() != nullptr, where, "hot buffer data_handle() is null");
    }
  }

  /// Gathers the latest call's inserted rows (its layer, its n) from the store.
  template <class T>
  void gather_inserted(kv_store_ref<T> const& store, view<T, 4> hot_k, view<T, 4> hot_v, std::int32_t* rejected,
                       cudaStream_t stream)
  {
    auto const rows = static_cast<std::size_t>(shape_.batch * shape_.kv_heads);
    gather(store, last_layer_,
           make_view(static_cast<std::int32_t const*>(ins_key_.data()), shape_.batch, shape_.kv_heads, last_n_),
           make_view(static_cast<std::int32_t const*>(ins_slot_.data()), shape_.batch, shape_.kv_heads, last_n_),
           std::span<std::int32_t const>(ins_count_.data(), rows), hot_k, hot_v, rejected, stream);
  }

  slot_table_shape shape_;
  Policy policy_;
  int device_ = 0;                           // current at construction: owns the state, runs the calls
  device_buffer<std::int32_t> slot_of_;      // [layers, rows, key_bound]
  device_buffer<std::int32_t> key_of_;       // [layers, rows, managed]
  device_buffer<float> score_;               // [layers, rows, managed]
  device_buffer<std::uint32_t> stamp_;       // [layers, rows, managed]
  device_buffer<std::uint32_t> pinned_;      // [layers, rows, managed]
  device_buffer<std::uint32_t> steps_;       // [layers, rows] calls since reset
  device_buffer<std::uint32_t> used_;        // [layers, rows] occupied slots
  device_buffer<std::uint8_t> hit_;          // [rows, max_keys] per-call outputs
  device_buffer<std::int32_t> ins_key_, ins_slot_, ins_evicted_;  // [rows, max_keys]
  device_buffer<std::int32_t> ins_count_;    // [rows]
  device_buffer<std::int32_t> counters_;     // [rows, 4]
  device_buffer<unsigned long long> sel_key_;  // [rows, 2 * managed] victim-selection scratch (two halves: the large sort ping-pongs)
  device_buffer<std::int32_t> sel_idx_;      // [rows, 2 * managed]
  device_buffer<unsigned long long> key_cache_;  // [rows, managed] eviction keys, when they exceed shared memory
  int smem_key_slots_ = 0;                   // eviction keys the step keeps in shared memory on this device
  index_t last_n_ = 0;
  index_t last_layer_ = -1;  // the layer of the latest access or step
};

/// Device pointers to what the latest `block_lfu_cache::step` decided, per sequence.
struct block_step_ref {
  std::int32_t const* promoted;     ///< [batch, blocks_per_step] resident blocks that gained a use
  std::int32_t const* ins_block;    ///< [batch, blocks_per_step] inserts, in processing order
  std::int32_t const* ins_slot;
  std::int32_t const* ins_evicted;
  std::uint8_t const* ins_copy;
  std::int32_t const* counters;     ///< [batch, 5] token hits, token misses, promoted, inserts, bad entries
  std::int32_t const* copy_count;   ///< [batch * kv_heads] rows to copy per (sequence, head)
};

/// PQCache's block-LFU cache on the GPU, for every layer and sequence of a
/// batch; each (layer, sequence) follows the contract of
/// `cpu::block_lfu_cache::step` (cache/block_lfu.hpp), with the selection's
/// positions >= max_tokens treated as padding and counted instead of thrown
/// on, and `offloaded_tokens` read per sequence from device memory (e.g. the
/// store's committed counts of the layer). `copy_blocks` then copies the
/// blocks the step marked for copying from the store into the hot buffer
/// [batch, kv_heads, capacity_blocks * block_tokens, head_dim]. Lives on the
/// device current at construction; calls from another device throw.
class block_lfu_cache {
 public:
  block_lfu_cache(cpu::block_lfu_config const& cfg, index_t layers, index_t batch, index_t kv_heads, index_t max_k)
    : cfg_{cfg}, layers_{layers}, batch_{batch}, kv_heads_{kv_heads}, max_k_{max_k}
  {
    constexpr char const* where = "gpu::block_lfu_cache";
    cfg_.validate(where);
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    PQKV_EXPECTS(layers > 0 && batch > 0 && kv_heads > 0 && max_k > 0, where, "layers=", layers, ", batch=", batch,
                 ", kv_heads=", kv_heads, ", max_k=", max_k, " must be positive");
    PQKV_EXPECTS(kv_heads * max_k < index_t{1} << 30, where, "kv_heads * max_k=", kv_heads * max_k, " is too large");
    max_blocks_ = (cfg_.max_tokens + cfg_.block_tokens - 1) / cfg_.block_tokens;
    auto const all = static_cast<std::size_t>(layers * batch);
    auto const cap = static_cast<std::size_t>(cfg_.capacity_blocks);
    auto const per = static_cast<std::size_t>(cfg_.blocks_per_step);
    auto const entries = static_cast<std::size_t>(batch * kv_heads * max_k);
    slot_of_ = device_buffer<std::int32_t>(all * static_cast<std::size_t>(max_blocks_));
    count_ = device_buffer<std::uint32_t>(all * static_cast<std::size_t>(max_blocks_));
    block_of_ = device_buffer<std::int32_t>(all * cap);
    use_ = device_buffer<float>(all * cap);
    stamp_ = device_buffer<std::uint32_t>(all * cap);
    size_ = device_buffer<std::uint32_t>(all);
    touch_ = device_buffer<std::uint32_t>(all);
    distinct_ = device_buffer<std::int32_t>(entries);
    sel_key_ = device_buffer<unsigned long long>(3 * entries);  // the ranked keys, then the select's scratch
    sel_idx_ = device_buffer<std::int32_t>(2 * entries);
    auto const b = static_cast<std::size_t>(batch);
    ranked_ = device_buffer<std::int32_t>(b * per);
    promoted_ = device_buffer<std::int32_t>(b * per);
    ins_block_ = device_buffer<std::int32_t>(b * per);
    ins_slot_ = device_buffer<std::int32_t>(b * per);
    ins_evicted_ = device_buffer<std::int32_t>(b * per);
    ins_copy_ = device_buffer<std::uint8_t>(b * per);
    counters_ = device_buffer<std::int32_t>(b * 5);
    auto const copy_rows = b * static_cast<std::size_t>(kv_heads) * per * cfg_.block_tokens;
    copy_src_ = device_buffer<std::int32_t>(copy_rows);
    copy_dst_ = device_buffer<std::int32_t>(copy_rows);
    copy_count_ = device_buffer<std::int32_t>(b * static_cast<std::size_t>(kv_heads));
    PQKV_CUDA_TRY(cudaMemset(copy_count_.data(), 0, copy_count_.size_bytes()));
    PQKV_CUDA_TRY(cudaMemset(counters_.data(), 0, counters_.size_bytes()));
    reset(nullptr);
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
  }

  [[nodiscard]] cpu::block_lfu_config const& config() const noexcept { return cfg_; }
  /// The device the cache was built on; its state and calls live there.
  [[nodiscard]] int device() const noexcept { return device_; }
  [[nodiscard]] block_step_ref last() const noexcept
  {
    return {promoted_.data(), ins_block_.data(), ins_slot_.data(), ins_evicted_.data(),
            ins_copy_.data(), counters_.data(), copy_count_.data()};
  }
  /// Device array [layers, batch, max_blocks]: slot of each block, -1 when absent.
  [[nodiscard]] std::int32_t const* slot_map() const noexcept { return slot_of_.data(); }
  [[nodiscard]] index_t max_blocks() const noexcept { return max_blocks_; }

  /// One decode step of `layer` for every sequence.
  /// @param selection [batch, kv_heads, k] device positions, -1 padded
  /// @param offloaded [batch] device: positions [0, offloaded[b]) are in the host store
  /// @param rows      [batch, kv_heads, k] device out: cache row of each hit, -1 elsewhere; or an empty view
  void step(index_t layer, view<std::int32_t const, 3> selection, std::span<std::int32_t const> offloaded,
            view<std::int32_t, 3> rows, cudaStream_t stream)
  {
    constexpr char const* where = "gpu::block_lfu_cache.step";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    PQKV_EXPECTS(layer >= 0 && layer < layers_, where, "layer=", layer, " is outside [0, ", layers_, ")");
    PQKV_EXPECTS(selection.extent(0) == batch_ && selection.extent(1) == kv_heads_, where, "selection extents (",
                 selection.extent(0), ", ", selection.extent(1), ", ", selection.extent(2),
                 ") differ from (batch, kv_heads)=(", batch_, ", ", kv_heads_, ")");
    PQKV_EXPECTS(selection.extent(2) <= max_k_, where, "selection.extent(2)=", selection.extent(2), " exceeds max_k=",
                 max_k_);
    PQKV_EXPECTS(static_cast<index_t>(offloaded.size()) == batch_ && offloaded.data() != nullptr, where,
                 "offloaded.size()=", offloaded.size(), ", batch=", batch_);
    bool const want_rows = rows.data_handle() != nullptr || element_count(rows) != 0;
    if (want_rows) {
      PQKV_EXPECTS(rows.extent(0) == batch_ && rows.extent(1) == kv_heads_ && rows.extent(2) == selection.extent(2) &&
                     rows.data_handle() != nullptr,
                   where, "rows extents (", rows.extent(0), ", ", rows.extent(1), ", ", rows.extent(2),
                   ") differ from selection's, or rows is null");
    }
    PQKV_EXPECTS(selection.data_handle() != nullptr || selection.extent(2) == 0, where,
                 "selection.data_handle() is null");
    pqkv::detail::cache_gpu::block_args a = base_args(layer);
    a.selection = selection.data_handle();
    a.offloaded = offloaded.data();
    a.rows = want_rows ? rows.data_handle() : nullptr;
    a.k = static_cast<int>(selection.extent(2));
    last_k_ = selection.extent(2);
    pqkv::detail::cache_gpu::launch_block_lfu_step(a, static_cast<int>(batch_), stream);
  }

  /// Copies the blocks the latest `step` marked (insert order, all heads)
  /// from the store's `layer` into the hot buffers.
  template <class T>
  void copy_blocks(kv_store_ref<T> const& store, index_t layer, view<T, 4> hot_k, view<T, 4> hot_v,
                   std::int32_t* rejected, cudaStream_t stream) const
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "gpu::block_lfu_cache.copy_blocks");
    index_t const n = static_cast<index_t>(cfg_.blocks_per_step) * cfg_.block_tokens;
    gather(store, layer, make_view(static_cast<std::int32_t const*>(copy_src_.data()), batch_, kv_heads_, n),
           make_view(static_cast<std::int32_t const*>(copy_dst_.data()), batch_, kv_heads_, n),
           std::span<std::int32_t const>(copy_count_.data(), static_cast<std::size_t>(batch_ * kv_heads_)), hot_k,
           hot_v, rejected, stream);
  }

  /// Empties every layer, as PQCache does at each prefill.
  void reset(cudaStream_t stream)
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "gpu::block_lfu_cache.reset");
    for (index_t l = 0; l < layers_; ++l) {
      pqkv::detail::cache_gpu::launch_block_lfu_reset(base_args(l), static_cast<int>(batch_), stream);
    }
  }

 private:
  pqkv::detail::cache_gpu::block_args base_args(index_t layer) const
  {
    auto const at = layer * batch_;
    auto const cap = static_cast<index_t>(cfg_.capacity_blocks);
    pqkv::detail::cache_gpu::block_args a{};
    a.slot_of = slot_of_.data() + at * max_blocks_;
    a.count = count_.data() + at * max_blocks_;
    a.block_of = block_of_.data() + at * cap;
    a.use = use_.data() + at * cap;
    a.stamp = stamp_.data() + at * cap;
    a.size = size_.data() + at;
    a.touch = touch_.data() + at;
    a.distinct = distinct_.data();
    a.sel_key = sel_key_.data();
    a.sel_idx = sel_idx_.data();
    a.ranked = ranked_.data();
    a.promoted = promoted_.data();
    a.ins_block = ins_block_.data();
    a.ins_slot = ins_slot_.data();
    a.ins_evicted = ins_evicted_.data();
    a.ins_copy = ins_copy_.data();
    a.counters = counters_.data();
    a.copy_src = copy_src_.data();
    a.copy_dst = copy_dst_.data();
    a.copy_count = copy_count_.data();
    a.max_blocks = max_blocks_;
    a.max_tokens = cfg_.max_tokens;
    a.kv_heads = static_cast<int>(kv_heads_);
    a.k = static_cast<int>(max_k_);
    a.cap = static_cast<int>(cfg_.capacity_blocks);
    a.block_tokens = static_cast<int>(cfg_.block_tokens);
    a.per_step = static_cast<int>(cfg_.blocks_per_step);
    return a;
  }

  cpu::block_lfu_config cfg_;
  index_t layers_, batch_, kv_heads_, max_k_;
  index_t max_blocks_ = 0;
  index_t last_k_ = 0;
  int device_ = 0;                          // current at construction: owns the state, runs the calls
  device_buffer<std::int32_t> slot_of_;     // [layers, batch, max_blocks]
  device_buffer<std::uint32_t> count_;      // [layers, batch, max_blocks]
  device_buffer<std::int32_t> block_of_;    // [layers, batch, cap]
  device_buffer<float> use_;                // [layers, batch, cap]
  device_buffer<std::uint32_t> stamp_;      // [layers, batch, cap]
  device_buffer<std::uint32_t> size_, touch_;  // [layers, batch]
  device_buffer<std::int32_t> distinct_;    // [batch, kv_heads * max_k] scratch
  device_buffer<unsigned long long> sel_key_;
  device_buffer<std::int32_t> sel_idx_;
  device_buffer<std::int32_t> ranked_, promoted_, ins_block_, ins_slot_, ins_evicted_;  // [batch, per_step]
  device_buffer<std::uint8_t> ins_copy_;
  device_buffer<std::int32_t> counters_;    // [batch, 5]
  device_buffer<std::int32_t> copy_src_, copy_dst_;  // [batch, kv_heads, per_step * block_tokens]
  device_buffer<std::int32_t> copy_count_;  // [batch * kv_heads]
};

}  // namespace pqkv::gpu
