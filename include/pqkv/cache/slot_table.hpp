// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::slot_table`: the CPU model of the GPU slot table that maps
/// selected keys (token or block indices) to the slots of a fixed-capacity
/// hot buffer under a `CachePolicy`. It is the reference a GPU table must match
/// decision for decision on the same trace.
///
/// Contract of `access(keys, step, newest_key)`, one call per decode step:
///  1. Every argument is checked before anything changes. Keys are int32 in
///     [0, key_bound); a negative key is padding: slot -1, not a hit, skipped.
///     `step` may not decrease from one call to the next.
///  2. Hits. A key is a hit when it was resident before this call. Each
///     occurrence of it gets its slot and `hit = 1`; the policy's `on_hit` runs
///     once per distinct key, in order of first occurrence, and the slot is
///     pinned: no miss of this call may evict it.
///  3. Misses, distinct keys in order of first occurrence. Each takes the
///     lowest free slot, else the policy's victim among the unpinned slots
///     (the evicted key leaves the map); `on_insert` runs and the slot is
///     pinned. Every occurrence of a missed key gets that slot and `hit = 0`
///     (the step's gather copies it once, as its `inserts` entry says).
///  4. When every slot is pinned the miss is bypassed: slot -1, `hit = 0`, no
///     insert; the caller reads that row from the host store. Pins only grow
///     within a call, so once one miss is bypassed all later misses are too.
///     A step with at most `capacity` distinct keys (less the reserved slot)
///     never bypasses.
///  5. Reserved slot (`reserve::newest`): slot `capacity - 1` holds the newest
///     token, written by the engine, as the engines' sparse-offload swap-in
///     buffers do. It never enters the map or the policy; each occurrence of
///     `newest_key` maps to it as a hit. The other slots form the policy's
///     `capacity - 1` slots.
/// With `cache::lru`, `lfu` and `fifo` the stamp is the caller's `step`, so
/// slots used in the same step tie on age and go in slot order.

#include <pqkv/cache/policy.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/error.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <queue>
#include <span>
#include <vector>

namespace pqkv::cpu {

/// Whether a slot table keeps a slot aside for the newest token.
enum class reserve : bool { none, newest };

/// A key that entered the table during one `access`.
struct slot_insert {
  std::int32_t key;      ///< the key that missed
  std::int32_t slot;     ///< the slot it now occupies
  std::int32_t evicted;  ///< the key it evicted, -1 when the slot was free

  friend bool operator==(slot_insert const&, slot_insert const&) = default;
};

/// What one `access` decided, per input key and per insert.
struct slot_access {
  std::vector<std::int32_t> slots;   ///< [keys] slot of each key; -1 for padding or a bypassed miss
  std::vector<std::uint8_t> hit;     ///< [keys] 1 where the key was resident before the call
  std::vector<slot_insert> inserts;  ///< one per distinct missed key that got a slot, in first-occurrence order
  std::size_t hits = 0;              ///< keys (occurrences) with hit = 1
  std::size_t misses = 0;            ///< non-padding keys (occurrences) with hit = 0, bypassed ones included
  std::size_t bypassed = 0;          ///< occurrences of misses that got no slot (step 4)
};

/// Key -> slot map of a `capacity`-slot hot buffer under `Policy`; see the
/// file comment for the contract. The map is dense (one int32 per possible
/// key), as the engines' per-request token -> slot tables are.
template <CachePolicy Policy = cache::lru>
  requires std::same_as<typename Policy::state_type, cache::slot_state>
class slot_table {
 public:
  /// @param capacity  slots of the hot buffer, the reserved one included
  /// @param key_bound keys must be in [0, key_bound)
  slot_table(std::uint32_t capacity, std::int32_t key_bound, Policy policy = Policy{},
             reserve reserved = reserve::none)
      : policy_{policy}, reserved_{reserved}, capacity_{capacity}, key_bound_{key_bound}
  {
    PQKV_EXPECTS(capacity > 0, "slot_table", "capacity=0 must be positive");
    PQKV_EXPECTS(capacity <= std::uint32_t{std::numeric_limits<std::int32_t>::max()}, "slot_table",
                 "capacity=", capacity, " exceeds the int32 slot range");
    PQKV_EXPECTS(reserved == reserve::none || capacity >= 2, "slot_table", "capacity=", capacity,
                 " leaves no slot besides the one reserved for the newest token");
    PQKV_EXPECTS(key_bound > 0, "slot_table", "key_bound=", key_bound, " must be positive");
    managed_ = capacity - (reserved == reserve::newest ? 1u : 0u);
    slot_of_.assign(static_cast<std::size_t>(key_bound), -1);
    key_of_.assign(managed_, -1);
    score_.resize(managed_);
    stamp_.resize(managed_);
    pinned_.resize(managed_);
    reset();
  }

  /// Maps one step's keys to slots; see the file comment. The result lives in
  /// the table until the next `access` or `reset`.
  /// @param newest_key the newest token, served by the reserved slot; -1 for none
  slot_access const& access(std::span<std::int32_t const> keys, std::uint32_t step, std::int32_t newest_key = -1)
  {
    constexpr char const* where = "slot_table.access";
    PQKV_EXPECTS(step >= last_step_, where, "step=", step, " is before the previous step=", last_step_);
    PQKV_EXPECTS(newest_key < 0 || reserved_ == reserve::newest, where, "newest_key=", newest_key,
                 " needs a table built with reserve::newest");
    PQKV_EXPECTS(newest_key < key_bound_, where, "newest_key=", newest_key, " >= key_bound=", key_bound_);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      PQKV_EXPECTS(keys[i] < key_bound_, where, "keys[", i, "]=", keys[i], " >= key_bound=", key_bound_);
    }
    last_step_ = step;
    next_epoch();
    cache::slot_state state = state_view();

    auto& r = result_;
    r.slots.assign(keys.size(), -1);
    r.hit.assign(keys.size(), 0);
    r.inserts.clear();
    r.hits = r.misses = r.bypassed = 0;

    auto const reserved_slot = static_cast<std::int32_t>(managed_);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      std::int32_t const key = keys[i];
      if (key < 0) { continue; }
      std::int32_t const slot = key == newest_key ? reserved_slot : slot_of_[static_cast<std::size_t>(key)];
      if (slot < 0) {
        ++r.misses;
        continue;
      }
      r.slots[i] = slot;
      r.hit[i] = 1;
      ++r.hits;
      if (slot != reserved_slot && pin(static_cast<std::uint32_t>(slot))) {
        policy_.on_hit(state, static_cast<std::uint32_t>(slot), step);
      }
    }

    bool exhausted = false;  // every slot pinned: all later misses bypass (contract 4)
    for (std::size_t i = 0; i < keys.size(); ++i) {
      std::int32_t const key = keys[i];
      if (key < 0 || r.hit[i] != 0) { continue; }
      std::int32_t& mapped = slot_of_[static_cast<std::size_t>(key)];
      if (mapped < 0 && !exhausted) {
        std::uint32_t const slot = take_slot(state);
        if (slot == cache::no_slot) {
          exhausted = true;
        } else {
          std::int32_t const evicted = key_of_[slot];
          if (evicted >= 0) { slot_of_[static_cast<std::size_t>(evicted)] = -1; }
          key_of_[slot] = key;
          mapped = static_cast<std::int32_t>(slot);
          pin(slot);
          policy_.on_insert(state, slot, step);
          r.inserts.push_back({key, mapped, evicted});
        }
      }
      r.slots[i] = mapped;
      if (mapped < 0) { ++r.bypassed; }
    }
    return r;
  }

  /// Slot of `key`, -1 when it is not resident (or negative). Does not count as a use.
  [[nodiscard]] std::int32_t lookup(std::int32_t key) const
  {
    PQKV_EXPECTS(key < key_bound_, "slot_table.lookup", "key=", key, " >= key_bound=", key_bound_);
    return key < 0 ? -1 : slot_of_[static_cast<std::size_t>(key)];
  }

  /// Key held by a managed `slot`, -1 when the slot is free.
  [[nodiscard]] std::int32_t key_at(std::uint32_t slot) const
  {
    PQKV_EXPECTS(slot < managed_, "slot_table.key_at", "slot=", slot, " >= managed slots=", managed_);
    return key_of_[slot];
  }

  /// Frees the slots of `keys` (negative keys and keys not resident are
  /// skipped), e.g. when the engine drops or rewrites those tokens.
  void invalidate(std::span<std::int32_t const> keys)
  {
    for (std::size_t i = 0; i < keys.size(); ++i) {
      PQKV_EXPECTS(keys[i] < key_bound_, "slot_table.invalidate", "keys[", i, "]=", keys[i],
                   " >= key_bound=", key_bound_);
    }
    for (std::int32_t const key : keys) {
      if (key >= 0 && slot_of_[static_cast<std::size_t>(key)] >= 0) {
        release(static_cast<std::uint32_t>(slot_of_[static_cast<std::size_t>(key)]));
      }
    }
  }

  /// Frees `slots` (negative entries and free slots are skipped), the engines'
  /// `invalidate(slots)`. The reserved slot is not a managed slot.
  void invalidate_slots(std::span<std::int32_t const> slots)
  {
    for (std::size_t i = 0; i < slots.size(); ++i) {
      PQKV_EXPECTS(slots[i] < static_cast<std::int32_t>(managed_), "slot_table.invalidate_slots", "slots[", i,
                   "]=", slots[i], " >= managed slots=", managed_);
    }
    for (std::int32_t const slot : slots) {
      if (slot >= 0 && key_of_[static_cast<std::size_t>(slot)] >= 0) { release(static_cast<std::uint32_t>(slot)); }
    }
  }

  /// Empties the table (preemption, a new request): every slot free, scores
  /// and stamps 0, and any step accepted next.
  void reset()
  {
    for (std::int32_t const key : key_of_) {
      if (key >= 0) { slot_of_[static_cast<std::size_t>(key)] = -1; }
    }
    std::fill(key_of_.begin(), key_of_.end(), -1);
    std::fill(score_.begin(), score_.end(), 0.f);
    std::fill(stamp_.begin(), stamp_.end(), 0u);
    std::fill(pinned_.begin(), pinned_.end(), 0u);
    std::vector<std::uint32_t> all(managed_);
    for (std::uint32_t s = 0; s < managed_; ++s) { all[s] = s; }
    free_ = free_heap{std::greater<>{}, std::move(all)};
    epoch_ = 0;
    last_step_ = 0;
    result_ = {};
  }

  /// Resident keys.
  [[nodiscard]] std::uint32_t size() const noexcept { return managed_ - static_cast<std::uint32_t>(free_.size()); }
  /// Slots of the hot buffer, the reserved one included.
  [[nodiscard]] std::uint32_t capacity() const noexcept { return capacity_; }
  /// Slots the policy manages: `capacity()`, less the reserved one.
  [[nodiscard]] std::uint32_t managed_slots() const noexcept { return managed_; }
  /// The slot kept for the newest token, -1 without `reserve::newest`.
  [[nodiscard]] std::int32_t reserved_slot() const noexcept
  {
    return reserved_ == reserve::newest ? static_cast<std::int32_t>(managed_) : -1;
  }
  [[nodiscard]] std::int32_t key_bound() const noexcept { return key_bound_; }
  [[nodiscard]] Policy const& policy() const noexcept { return policy_; }
  /// The policy's score of a managed slot (LFU: its use count).
  [[nodiscard]] float score(std::uint32_t slot) const
  {
    PQKV_EXPECTS(slot < managed_, "slot_table.score", "slot=", slot, " >= managed slots=", managed_);
    return score_[slot];
  }
  /// The policy's stamp of a managed slot.
  [[nodiscard]] std::uint32_t stamp(std::uint32_t slot) const
  {
    PQKV_EXPECTS(slot < managed_, "slot_table.stamp", "slot=", slot, " >= managed slots=", managed_);
    return stamp_[slot];
  }

 private:
  using free_heap = std::priority_queue<std::uint32_t, std::vector<std::uint32_t>, std::greater<>>;

  // Built on use, not stored, so that a copied or moved table views its own arrays.
  cache::slot_state state_view() noexcept
  {
    return {score_.data(), stamp_.data(), pinned_.data(), managed_, epoch_};
  }

  // A fresh epoch per call; on wrap-around the pins are cleared so that a slot
  // last pinned 2^32 calls ago does not look pinned now.
  void next_epoch()
  {
    if (++epoch_ == 0) {
      std::fill(pinned_.begin(), pinned_.end(), 0u);
      epoch_ = 1;
    }
  }

  // Pins `slot` for this call; false when it already was.
  bool pin(std::uint32_t slot)
  {
    if (pinned_[slot] == epoch_) { return false; }
    pinned_[slot] = epoch_;
    return true;
  }

  // The lowest free slot, else the policy's victim, else no_slot.
  std::uint32_t take_slot(cache::slot_state const& state)
  {
    if (!free_.empty()) {
      std::uint32_t const slot = free_.top();
      free_.pop();
      return slot;
    }
    std::uint32_t const slot = static_cast<std::uint32_t>(policy_.victim(state));
    if (slot == cache::no_slot) { return slot; }
    PQKV_EXPECTS(slot < managed_ && state.evictable(slot), "slot_table.access", "the policy's victim slot=", slot,
                 " is out of range or pinned by this step (managed slots=", managed_, ")");
    return slot;
  }

  void release(std::uint32_t slot)
  {
    slot_of_[static_cast<std::size_t>(key_of_[slot])] = -1;
    key_of_[slot] = -1;
    score_[slot] = 0.f;
    stamp_[slot] = 0;
    free_.push(slot);
  }

  Policy policy_;
  reserve reserved_;
  std::uint32_t capacity_;
  std::uint32_t managed_ = 0;
  std::int32_t key_bound_;
  std::vector<std::int32_t> slot_of_;  // [key_bound] slot of each key, -1 when not resident
  std::vector<std::int32_t> key_of_;   // [managed] key in each slot, -1 when free
  std::vector<float> score_;           // [managed]
  std::vector<std::uint32_t> stamp_;   // [managed]
  std::vector<std::uint32_t> pinned_;  // [managed] epoch of the last call that used the slot
  free_heap free_;
  std::uint32_t epoch_ = 0;
  std::uint32_t last_step_ = 0;
  slot_access result_;
};

}  // namespace pqkv::cpu
