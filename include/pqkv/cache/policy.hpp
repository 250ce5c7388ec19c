// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Replacement policies of a fixed-capacity GPU cache, as small types
/// that model `pqkv::CachePolicy`, and the per-slot state they score.
///
/// A policy never sees keys: the slot table (`cpu::slot_table`, later
/// `gpu::slot_table`) keeps the key -> slot map, fills free slots first and
/// asks the policy for a victim only when every slot is taken. The policy
/// writes its own per-slot numbers into a `slot_state` and picks the victim
/// from them. Everything here is `PQKV_HD` and allocation-free, so the same
/// policy object is passed by value into kernels.
///
/// Eviction order (the contract a GPU table reproduces): among the evictable
/// slots, the victim is the one with the lowest `score`, then the oldest
/// (smallest) `stamp`, then the lowest slot index. `slot_state::argmin` is
/// that order; `slot_state::evicts_before` is its comparator, for a parallel
/// reduction.

#include <pqkv/core/concepts.hpp>
#include <pqkv/core/macros.hpp>

#include <cstdint>

namespace pqkv::cache {

/// "No slot": what `slot_state::argmin` returns when no slot may be evicted.
inline constexpr std::uint32_t no_slot = 0xFFFFFFFFu;

/// Per-slot numbers a policy scores: a trivially copyable view over arrays the
/// table owns. `score` and `stamp` belong to the policy; `pinned` belongs to
/// the table, which writes the current `epoch` into `pinned[slot]` when a slot
/// is hit or filled, so that a slot in use by the current step is never
/// evicted by that same step. `pinned == nullptr` means nothing is pinned.
struct slot_state {
  float* score = nullptr;                 // [capacity] lower is evicted first (LFU: use count)
  std::uint32_t* stamp = nullptr;         // [capacity] lower is older (step or touch of last use/insert)
  std::uint32_t const* pinned = nullptr;  // [capacity] epoch of the table's last use of the slot, or null
  std::uint32_t capacity = 0;             // slots [0, capacity) are managed; reserved slots lie above
  std::uint32_t epoch = 0;                // the table's current epoch (one per `access` call)

  /// True unless the current step already uses `slot`.
  [[nodiscard]] PQKV_HD bool evictable(std::uint32_t slot) const
  {
    return pinned == nullptr || pinned[slot] != epoch;
  }

  /// True when slot `a` goes before slot `b` in eviction order: lower score,
  /// then older stamp, then lower index. A total order when scores are not NaN.
  [[nodiscard]] PQKV_HD bool evicts_before(std::uint32_t a, std::uint32_t b) const
  {
    if (score[a] != score[b]) { return score[a] < score[b]; }
    if (stamp[a] != stamp[b]) { return stamp[a] < stamp[b]; }
    return a < b;
  }

  /// The first evictable slot in eviction order, or `no_slot` when none is.
  [[nodiscard]] PQKV_HD std::uint32_t argmin() const
  {
    std::uint32_t best = no_slot;
    for (std::uint32_t s = 0; s < capacity; ++s) {
      if (evictable(s) && (best == no_slot || evicts_before(s, best))) { best = s; }
    }
    return best;
  }
};

/// Least recently used: evicts the slot whose last hit or insert is oldest.
/// `stamp` = step of the last use; `score` stays 0. Slots used in the same step
/// tie and go in slot order.
struct lru {
  using state_type = slot_state;
  PQKV_HD void on_insert(state_type& s, std::uint32_t slot, std::uint32_t step) const
  {
    s.score[slot] = 0.f;
    s.stamp[slot] = step;
  }
  PQKV_HD void on_hit(state_type& s, std::uint32_t slot, std::uint32_t step) const { s.stamp[slot] = step; }
  [[nodiscard]] PQKV_HD std::uint32_t victim(state_type const& s) const { return s.argmin(); }
};

/// Least frequently used, with counts that never decay (as PQCache): a slot
/// enters with use 1 and gains 1 per hit (the table hits a slot at most once
/// per step). Victim: the lowest use count; among equal counts the oldest,
/// i.e. the slot whose last touch (insert or hit) came first, which is the one
/// that reached its current count first; then the lowest slot. Counts are
/// floats, exact up to 2^24 uses, where they saturate.
struct lfu {
  using state_type = slot_state;
  PQKV_HD void on_insert(state_type& s, std::uint32_t slot, std::uint32_t step) const
  {
    s.score[slot] = 1.f;
    s.stamp[slot] = step;
  }
  PQKV_HD void on_hit(state_type& s, std::uint32_t slot, std::uint32_t step) const
  {
    s.score[slot] += 1.f;
    s.stamp[slot] = step;
  }
  [[nodiscard]] PQKV_HD std::uint32_t victim(state_type const& s) const { return s.argmin(); }
};

/// First in, first out: evicts the slot filled longest ago; hits change
/// nothing. `stamp` = step of the insert; `score` stays 0.
struct fifo {
  using state_type = slot_state;
  PQKV_HD void on_insert(state_type& s, std::uint32_t slot, std::uint32_t step) const
  {
    s.score[slot] = 0.f;
    s.stamp[slot] = step;
  }
  PQKV_HD void on_hit(state_type&, std::uint32_t, std::uint32_t) const {}
  [[nodiscard]] PQKV_HD std::uint32_t victim(state_type const& s) const { return s.argmin(); }
};

static_assert(CachePolicy<lru>);
static_assert(CachePolicy<lfu>);
static_assert(CachePolicy<fifo>);

}  // namespace pqkv::cache
